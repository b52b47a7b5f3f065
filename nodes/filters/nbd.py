"""nbd: the pure proxy (nbdkit-nbd-plugin as a filter): serve what the upstream serves.

Every request goes to the `--upstream` URI through libnbd (nodes/upstream.py) with its flags
(FUA, NO_HOLE, FAST_ZERO, REQ_ONE, DF) unchanged; capabilities, size and block sizes are the
upstream's. Better than nbdkit's nbd plugin: upstream holes stay holes (OFFSET_HOLE chunks, not
zero bytes), a pool of upstream connections is used when the upstream allows multi-conn, and a
lost upstream is reconnected in the background (requests fail with EIO meanwhile).

Params: `context` (repeated): a meta context to pass on besides base:allocation, asked of the
upstream by name (`context=qemu:dirty-bitmap:backup` through to a cow node's bitmap; one the
upstream does not have is not offered). The upstream comes from `--upstream URI`; TLS from
`--upstream-tls-certificates`.

Example: `nbdfabric node nbd --upstream nbd+unix:///?socket=/tmp/m.sock --listen 127.0.0.1:0`
puts a unix-socket export on TCP.
"""

from __future__ import annotations

from typing import Any

from ..base import Extents, Filter
from ..params import Many, Params, repeated
from ..registry import register


class NbdParams(Params):
    context: Many = repeated(
        "a meta context to ask the upstream for and pass on besides base:allocation, by name "
        "(qemu:allocation-depth, qemu:dirty-bitmap:NAME); one the upstream lacks is not offered"
    )


@register
class Nbd(Filter):
    """A pass-through proxy to the upstream NBD server."""

    kind = "nbd"
    shareable = True  #: --workers (see workers.py)
    Params = NbdParams

    def __init__(self, params: NbdParams, next: Any) -> None:
        super().__init__(params, next)
        if params.context:  # asked for on the upstream's every connection
            next.wanted_contexts = tuple(params.context)

    def contexts(self) -> tuple[str, ...]:
        return tuple(self.next.contexts())

    async def context_extents(self, context: str, count: int, offset: int, flags: int) -> Extents:
        return await self.next.context_extents(context, count, offset, flags)
