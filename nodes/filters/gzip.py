"""gzip: serve the uncompressed content of a gzip-compressed upstream (nbdkit-gzip-filter).

gzip cannot be read at random, so at start the node reads the whole upstream (4 MiB at a time),
decompresses it into a hidden temporary file in $TMPDIR (default /var/tmp, as nbdkit), and then
serves reads from that file. The file has no name (O_TMPFILE, or unlinked right after it is
made): nothing is left behind, even after kill -9. Blocks of zeros are not written, so the file
takes only the image's data's room. The export is read-only, its size is the uncompressed size,
and extents are not advertised (as nbdkit's). The node serves once decompression is done; the
upstream is not read again, so its health no longer matters.

Like gzip(1), and unlike nbdkit (which stops after the first member), a multi-member stream
(`cat a.gz b.gz`) gives the members' contents one after the other, and a later member that is
cut short (even inside its 2-byte magic) is refused. Bytes after the last member that do not
start another one are ignored with a warning (in `ctl info` too), as nbdkit and gzip(1) do.
Anything wrong with the input (not gzip, corrupt, truncated) stops the node at start with a
one-line message (nbdkit instead starts, and fails every client's handshake with a zlib
message), and so does a failure to write the temporary file (a full $TMPDIR).

Params: none. `nbdfabric ctl ADDR info` shows the compressed and uncompressed sizes, the members,
the ignored trailing bytes and the decompression time.

Example (a KubeVirt CDI-style import of a compressed image):
`nbdfabric node http https://images.example/disk.img.gz --listen unix:/tmp/gz.sock`, then
`nbdfabric node gzip --upstream 'nbd+unix:///?socket=/tmp/gz.sock' --listen unix:/tmp/img.sock`
and `qemu-img convert -f raw -O qcow2 'nbd+unix:///?socket=/tmp/img.sock' disk.qcow2`.
"""

from __future__ import annotations

import zlib
from typing import Any

from ..registry import register
from ._decompress import PIECE, Decompress, Sink, Stream


class GzipStream(Stream):
    name = "gzip"
    unit = "member"
    magic = b"\x1f\x8b"
    errors = (zlib.error,)

    def new_decoder(self) -> Any:
        return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip only, as nbdkit's

    def decode(self, data: bytes | memoryview, sink: Sink) -> bytes | None:
        d = self._decoder
        while True:
            out = d.decompress(data, PIECE)
            if out:
                sink(out)
            if d.eof:
                return bytes(d.unused_data)
            data = d.unconsumed_tail
            # A full piece of output may leave some in zlib with no input left: ask again.
            if not data and len(out) < PIECE:
                return None

    def not_a_member(self, at: int) -> None:
        """Trailing garbage is ignored (counted, and warned about at start)."""


@register
class Gzip(Decompress):
    """Serves the uncompressed content of a gzip-compressed upstream (read-only)."""

    kind = "gzip"
    stream_type = GzipStream
