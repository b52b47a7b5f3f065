"""tar: serve one file inside an uncompressed tar archive held by the upstream (nbdkit-tar-filter).

At start the node walks the archive's headers (reading only headers, skipping every member's
data) to the first member named `tar-entry`, then serves that member's data as the whole
export: a byte window of the upstream, as the `offset` filter serves one. Reads, writes (in
place, when the upstream is writable), zero, trim, cache and extents go to the upstream
shifted into the window; the size is the member's and cannot change, so the archive stays a
valid archive (though checksums kept in other members, an OVA's .mf, no longer match after a
write). Capabilities are the upstream's.

Archives of ustar, GNU (long names in ././@LongLink members, sizes past 8 GiB in base-256) and
pax (`path=` and `size=` records) formats are read; the name must match the member's exactly,
as `tar tf` lists it (a trailing slash aside). The node refuses to start, with a message
naming the entry and the reason, when the entry is missing (the message lists the members),
is a directory, a link, a device or a sparse member (tar --sparse: its data is not stored as
one range), when its data runs past the upstream's end, or when the upstream is not a tar
archive or is corrupt or truncated before the entry.

Differences from nbdkit 1.32's filter, which runs GNU tar over the archive on the first
client's connection: a missing or unservable entry stops this node at start (nbdkit starts
and fails every client's handshake); an entry with a GNU long name is served from its data
(nbdkit serves the ././@LongLink block holding the name); directories and links are refused
(nbdkit serves 0 bytes); sparse members, and members whose data runs past the upstream's end,
are refused (nbdkit serves a window past the archive's end and aborts on the first block
status there); names are matched exactly (GNU tar also matches "d" to the member "d/x", which
nbdkit then serves). As nbdkit, the first member of a name is served when there are several.

Params:
- `tar-entry` (required; also the first bare word): the member's name, as `tar tf` lists it.
- `tar-limit` (size, default 0: no limit): read headers only in the first SIZE bytes of the
  archive (read-ahead included); an entry whose header lies further is not found. nbdkit
  1.36 has a param of this name; 1.32, the one compared with here, has none.
- `tar`: nbdkit's GNU tar program; accepted so nbdkit command lines work, and unused (this
  node reads the headers itself).

Example (an OVA: a tar of an .ovf and a disk image, over http):
`nbdfabric node http https://example.com/vm.ova --listen unix:/tmp/ova.sock`, then
`nbdfabric node tar disk1.vmdk --upstream 'nbd+unix:///?socket=/tmp/ova.sock'
--listen unix:/tmp/disk.sock` and `qemu-img convert -O qcow2 'nbd+unix:///?socket=/tmp/disk.sock'
disk.qcow2`.
"""

from __future__ import annotations

import logging
from typing import Any

from ..base import Backend, read_flat
from ..params import Params, Size, param
from ..registry import register
from ._tarindex import Entry, find_entry, show
from .offset import Window

log = logging.getLogger("nbdfabric.tar")

#: Upstream read size while walking the headers: the headers of small members (an OVA's .ovf
#: and .mf) come in one read, not one per 512-byte block.
READ_AHEAD = 64 * 1024


class TarParams(Params):
    tar_entry: str = param(
        description="the file inside the archive to serve, exactly as `tar tf` lists it",
        min_length=1,
    )
    tar_limit: Size = param(
        0, "read headers only in the first SIZE bytes of the archive (0: no limit)"
    )
    tar: str | None = param(
        None, "nbdkit's GNU tar program: accepted for compatibility, unused (headers are read here)"
    )


class HeaderReader:
    """The upstream's bytes for the header walk, read ahead and reused: within the upstream's
    block size limits (aligned to its minimum, at most its maximum a request)."""

    def __init__(self, upstream: Backend, size: int, limit: int) -> None:
        caps = upstream.capabilities()
        self.upstream, self.size, self.limit = upstream, size, limit
        self.align = caps.block_min or 1
        self.most = caps.block_max or 32 * 1024 * 1024
        self.at, self.data = 0, b""
        self.bytes_read = 0

    async def read(self, offset: int, length: int) -> bytes:
        start = offset - self.at
        if start >= 0 and start + length <= len(self.data):
            return self.data[start : start + length]
        want = max(length, READ_AHEAD)
        if self.limit:  # tar-limit bounds what is read, not only what is looked at
            want = max(length, min(want, self.limit - offset))
        begin = offset - offset % self.align
        end = min(self.size, -(-(offset + want) // self.align) * self.align)
        buf = bytearray(end - begin)
        view = memoryview(buf)
        for at in range(0, len(buf), self.most):
            await read_flat(self.upstream, view[at : at + self.most], begin + at)
        self.bytes_read += len(buf)
        self.at, self.data = begin, bytes(buf)
        return self.data[offset - begin : offset - begin + length]


@register
class Tar(Window):
    """Serves one file of a tar archive held by the upstream, as a byte window of it."""

    kind = "tar"
    Params = TarParams
    params: TarParams
    magic = "tar-entry"

    def __init__(self, params: TarParams, next: Backend) -> None:
        super().__init__(params, next)
        self.entry: Entry | None = None
        self.header_bytes_read = 0

    async def locate(self, upstream_size: int) -> tuple[int, int]:
        wanted = self.params.tar_entry.encode()  # names are compared as the bytes stored
        reader = HeaderReader(self.next, upstream_size, self.params.tar_limit)
        walk = find_entry(wanted, upstream_size, self.params.tar_limit)
        try:
            want = next(walk)
            while True:
                want = walk.send(await reader.read(*want))
        except StopIteration as done:
            self.entry = done.value
        finally:
            self.header_bytes_read = reader.bytes_read
        assert self.entry is not None
        log.info(
            "tar: entry %s (%s): %d bytes at offset %d; %d bytes of headers read",
            show(self.entry.name), self.entry.format, self.entry.size, self.entry.offset,
            reader.bytes_read,
        )  # fmt: skip
        return self.entry.offset, self.entry.size

    def status(self) -> dict[str, Any]:
        entry = self.entry
        return {
            **self.next.status(),
            "entry": self.params.tar_entry,
            "format": entry.format if entry else None,
            "header": entry.header if entry else None,
            "start": self.start_at,
            "length": self.length,
            "header_bytes_read": self.header_bytes_read,
        }
