"""full: a disk that reads as zeros and is out of space (nbdkit-full-plugin).

Every write, write-zeroes and trim fails with ENOSPC, like a thin-provisioned disk whose host
ran out of space; reads return zeros. A fast-zero request gets ENOTSUP (the spec's "would not
be fast") as nbdkit answers. Use it to test how clients and filters handle ENOSPC.

Params: `size` (magic, required).

Example: `nbdfabric node full 1G --listen unix:/tmp/full.sock`, then
`qemu-io -f raw 'nbd+unix:///?socket=/tmp/full.sock' -c 'write 0 4k'` reports
"No space left on device".
"""

from __future__ import annotations

import errno

from ..base import Capabilities, Support, ZeroContent
from ..params import Params, Size, param
from ..protocol.constants import CmdFlag
from ..registry import register


class FullParams(Params):
    size: Size = param(description="virtual size of the disk (e.g. 1G)")


def _no_space() -> OSError:
    return OSError(errno.ENOSPC, "the disk is full")


@register
class Full(ZeroContent):
    """Reads zeros; every write fails with ENOSPC."""

    kind = "full"
    shareable = True  #: --workers (see workers.py)
    Params = FullParams
    magic = "size"
    params: FullParams

    def capabilities(self) -> Capabilities:
        # Writable on paper: the point is that writes are accepted by the protocol and then fail.
        return Capabilities(
            size=self.params.size,
            writable=True,
            trim=True,
            zero=Support.NATIVE,
            fast_zero=True,
            cache=Support.NATIVE,
            extents=True,
            multi_conn=True,
        )

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        raise _no_space()

    async def trim(self, count: int, offset: int, flags: int) -> None:
        raise _no_space()

    async def zero(self, count: int, offset: int, flags: int) -> None:
        if flags & CmdFlag.FAST_ZERO:
            raise OSError(errno.ENOTSUP, "zeroing a full disk is not fast")
        raise _no_space()
