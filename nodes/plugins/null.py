"""null: a disk that reads as zeros and discards every write (nbdkit-null-plugin).

Everything written is thrown away, so reads always return zeros and extents report the whole
disk as a hole. Useful as a sink for benchmarks and as a stand-in upstream in tests; most
real clients (file systems, caches) are confused by a disk that forgets what they wrote.

Params: `size` (magic, default 0: an empty disk, as nbdkit's).

Example: `nbdfabric node null 1G --listen unix:/tmp/null.sock`, then
`nbdcopy disk.img 'nbd+unix:///?socket=/tmp/null.sock'` measures the read side of a copy.
"""

from __future__ import annotations

from ..base import Capabilities, Support, ZeroContent
from ..params import Params, Size, param
from ..registry import register


class NullParams(Params):
    size: Size = param(0, description="virtual size of the disk (e.g. 1G); default 0")


@register
class Null(ZeroContent):
    """Reads zeros, discards writes."""

    kind = "null"
    shareable = True  #: --workers (see workers.py)
    Params = NullParams
    magic = "size"
    params: NullParams

    def capabilities(self) -> Capabilities:
        # Nothing is stored, so every write-side operation is trivially durable and cheap.
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

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        pass

    async def flush(self, flags: int) -> None:
        pass

    async def trim(self, count: int, offset: int, flags: int) -> None:
        pass

    async def zero(self, count: int, offset: int, flags: int) -> None:
        pass
