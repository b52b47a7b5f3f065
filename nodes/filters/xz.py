"""xz: serve the uncompressed content of an xz-compressed upstream (nbdkit-xz-filter).

At start the node reads the whole upstream (4 MiB at a time), decompresses it into a hidden
temporary file in $TMPDIR (default /var/tmp) and serves reads from that file, exactly as the
gzip filter does (see its manual: no name left behind, zero blocks not written, read-only, no
extents). This differs from nbdkit's xz filter, which reads the stream's index and decodes only
the xz blocks a client reads (Python's lzma cannot decode single blocks): here every start
reads and decodes the whole stream before the node serves, and $TMPDIR needs room for the
image's data, whatever the block size. Concatenated streams, with stream padding (zero bytes, a
multiple of 4) between or after them, are read as xz(1) reads them (nbdkit 1.32.5 aborts on
padding after the last of several streams). Anything else after the last stream, input that is
not xz, corrupt (including a failed integrity check) or truncated stops the node at start with
a one-line message (nbdkit starts, and fails every client's handshake instead; it finds corrupt
block data only when a client reads that block).

Params (nbdkit's names, accepted so nbdkit command lines work, with no effect here since no
block is held in memory): `xz-max-block` (size, default 512M), `xz-max-depth` (>= 1, default 8).

Example: `nbdfabric node file disk.img.xz --listen unix:/tmp/xz.sock`, then
`nbdfabric node xz --upstream 'nbd+unix:///?socket=/tmp/xz.sock' --listen unix:/tmp/img.sock`
and `nbdcopy 'nbd+unix:///?socket=/tmp/img.sock' disk.img`.
"""

from __future__ import annotations

import lzma
from typing import Any

from ..params import Params, Size, param
from ..registry import register
from ._decompress import PIECE, Decompress, Sink, Stream, StreamError


class XzParams(Params):
    xz_max_block: Size = param(512 * 1024 * 1024, "accepted for nbdkit compatibility; no effect")
    xz_max_depth: int = param(8, "accepted for nbdkit compatibility; no effect", ge=1)


class XzStream(Stream):
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


@register
class Xz(Decompress):
    """Serves the uncompressed content of an xz-compressed upstream (read-only)."""

    kind = "xz"
    Params = XzParams
    stream_type = XzStream
