"""nbd: the pure proxy (nbdkit-nbd-plugin as a filter): serve what the upstream serves.

Every request goes to the `--upstream` URI through libnbd (nodes/upstream.py) with its flags
(FUA, NO_HOLE, FAST_ZERO, REQ_ONE, DF) unchanged; capabilities, size and block sizes are the
upstream's. Better than nbdkit's nbd plugin: upstream holes stay holes (OFFSET_HOLE chunks, not
zero bytes), a pool of upstream connections is used when the upstream allows multi-conn, and a
lost upstream is reconnected in the background (requests fail with EIO meanwhile).

Params: none (the upstream comes from `--upstream URI`; TLS from `--upstream-tls-certificates`).

Example: `nbdfabric node nbd --upstream nbd+unix:///?socket=/tmp/m.sock --listen 127.0.0.1:0`
puts a unix-socket export on TCP.
"""

from __future__ import annotations

from ..base import Filter
from ..params import Params
from ..registry import register


class NbdParams(Params):
    pass


@register
class Nbd(Filter):
    """A pass-through proxy to the upstream NBD server."""

    kind = "nbd"
    shareable = True  #: --workers (see workers.py)
    Params = NbdParams
