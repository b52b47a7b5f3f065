"""exitlast: the node exits when its last client disconnects (nbdkit-exitlast-filter).

A client counts from the end of its handshake to its disconnection. When the count drops to
zero the node shuts down as on SIGTERM (it takes no new clients; one still negotiating is
told the server is shutting down) and exits with status 0. It never exits before its first
client: a node nobody connects to serves on.

Uses: a node started for one job that should go away with its client (nbdkit-captive(1)'s
`--run` is another way), or one a superserver starts on demand.

Params: none.

Example: `nbdfabric node exitlast --upstream nbd+unix:///?socket=disk.sock --listen
unix:/tmp/once.sock & qemu-img convert nbd+unix:///?socket=/tmp/once.sock out.qcow2`: the
node exits when qemu-img is done.

In a topology, give such a node `restart: on-failure` or `restart: never`: with `always` (the
default) the supervisor starts it again.

Differences from nbdkit 1.32: nbdkit also counts a client's NBD_OPT_INFO (it opens and closes
the export for it), so `nbdinfo --list` makes it exit after its first INFO; here only clients
that finish the handshake count.
"""

from __future__ import annotations

import logging
from typing import Any

from ..base import Backend, Filter, current_client
from ..params import Params
from ..registry import register

log = logging.getLogger("nbdfabric.exitlast")


class ExitlastParams(Params):
    pass


@register
class Exitlast(Filter):
    """Exits the node when its last client disconnects."""

    kind = "exitlast"
    passes_contexts = True  #: meta contexts pass through (see Filter)
    Params = ExitlastParams
    params: ExitlastParams

    def __init__(self, params: ExitlastParams, next: Backend) -> None:
        super().__init__(params, next)
        #: Clients between their handshake's end and their disconnection, by connection id.
        self.clients: set[int] = set()

    async def open_connection(self) -> None:
        await self.next.open_connection()
        self.clients.add(current_client.get().connection_id)

    async def close_connection(self) -> None:
        try:
            await self.next.close_connection()
        finally:
            # Also after an open_connection() that failed: that client was never counted.
            client = current_client.get().connection_id
            if client in self.clients:
                self.clients.discard(client)
                if not self.clients:
                    self._exit()

    def _exit(self) -> None:
        log.info("exitlast: exiting on last client connection")
        if self.stop_node is not None:
            self.stop_node()

    def status(self) -> dict[str, Any]:
        return {**self.next.status(), "exitlast": {"connected": len(self.clients)}}
