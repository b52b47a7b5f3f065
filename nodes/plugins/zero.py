"""zero: a read-only disk of zeros (nbdkit-zero-plugin, deprecated there in favour of null).

nbdkit's zero plugin is always zero bytes long and takes no parameters; ours keeps that as the
default and also accepts a `size`, which makes it a read-only `null`. Reads return zeros, every
write is refused with EPERM, extents report one hole.

Params: `size` (magic, default 0).

Example: `nbdfabric node zero --listen unix:/tmp/z.sock` serves an empty disk for testing how
clients cope with size 0; `nbdfabric node zero 1G` a 1 GiB read-only hole.
"""

from __future__ import annotations

from ..base import Capabilities, Support, ZeroContent
from ..params import Params, Size, param
from ..registry import register


class ZeroParams(Params):
    size: Size = param(0, description="virtual size (nbdkit's zero plugin is always 0)")


@register
class Zero(ZeroContent):
    """A read-only disk that is all zeros (size 0 by default)."""

    kind = "zero"
    shareable = True  #: --workers (see workers.py)
    Params = ZeroParams
    magic = "size"
    params: ZeroParams

    def capabilities(self) -> Capabilities:
        return Capabilities(
            size=self.params.size, cache=Support.NATIVE, extents=True, multi_conn=True
        )
