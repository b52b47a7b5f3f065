"""nbd: the pure proxy (nbdkit-nbd-plugin as a filter): serve what the upstream serves.

Every request goes to the `--upstream` URI through libnbd (nodes/upstream.py) with its flags
(FUA, NO_HOLE, FAST_ZERO, REQ_ONE, DF) unchanged; capabilities, size and block sizes are the
upstream's. Better than nbdkit's nbd plugin: upstream holes stay holes (OFFSET_HOLE chunks, not
zero bytes), a pool of upstream connections is used when the upstream allows multi-conn, and a
lost upstream is reconnected in the background (requests fail with EIO meanwhile).

Meta contexts: every one the upstream lists (a cow node's `qemu:dirty-bitmap:NAME`, qemu-nbd's
`qemu:allocation-depth`) is offered and answered as the upstream answers it, as by every filter
that leaves bytes where they are.

Relay (the default; `relay=false` turns it off): each client gets an upstream connection of
its own, opened through libnbd with the client's options (structured replies, its meta
context), and its requests and the upstream's replies are then passed on as bytes, headers
parsed only to cut the stream into whole messages and to renumber a block-status context id
(nodes/server/relay.py): about 40K instructions a 4K read where re-issuing through libnbd's
Python binding costs 106K (bench/RESULTS.md). A lost upstream still gives EIO for what was
outstanding, the client keeps its connection, and relaying goes on once the upstream is back.
Connections that do not relay (served as above, through the shared pool): an nbds://
upstream (a client over TLS is relayed), more than one meta context selected, --ordering
ordered|serial, --eof-tolerant, an upstream unreachable when the client connects, or one
that lacks something the client was told (size, a flag, the context, block sizes). The node's
control API shows the relayed connections beside the pool (GetInfo's upstream detail:
`relayed` with clients, how many of their connections are down, requests in flight).

Params: `relay` (default true): as above. `context` (repeated): pass on only these meta
contexts besides base:allocation, asked of the upstream by name whether it lists them or not
(one it does not have is not offered). The upstream comes from `--upstream URI`; TLS from
`--upstream-tls-certificates`.

Example: `nbdfabric node nbd --upstream nbd+unix:///?socket=/tmp/m.sock --listen 127.0.0.1:0`
puts a unix-socket export on TCP.
"""

from __future__ import annotations

from typing import Any

from ..base import Filter
from ..params import Many, Params, param, repeated
from ..registry import register


class NbdParams(Params):
    relay: bool = param(
        True,
        "relay each client's requests and replies as bytes over an upstream connection of "
        "its own (where the connection allows: see the kind's manual); false: re-issue them "
        "through libnbd over the shared pool",
    )
    context: Many = repeated(
        "pass on only this meta context besides base:allocation (default: all the upstream "
        "lists), by name: qemu:allocation-depth, qemu:dirty-bitmap:NAME"
    )


@register
class Nbd(Filter):
    """A pass-through proxy to the upstream NBD server."""

    kind = "nbd"
    passes_contexts = True
    shareable = True  #: --workers (see workers.py)
    Params = NbdParams

    def __init__(self, params: NbdParams, next: Any) -> None:
        super().__init__(params, next)
        if params.context:  # asked for on the upstream's every connection
            next.wanted_contexts = tuple(params.context)
        #: Where sessions relay to (server/relay.py), with relay=true.
        self.relay_upstream = next if params.relay else None
