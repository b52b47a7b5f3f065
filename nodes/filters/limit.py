"""limit: serve at most N clients at once (nbdkit-limit-filter).

Clients are counted from the end of their handshake to their disconnection. While `limit` are
connected, a new client is refused as nbdkit refuses it:
- when it connects: the connection is closed before the greeting, without a word (nbdkit's
  .preconnect), so a full node spends nothing on it (no TLS, no negotiation);
- when it asks for the export (NBD_OPT_GO or NBD_OPT_INFO: NBD_REP_ERR_UNKNOWN, which libnbd
  reports as ENOENT; NBD_OPT_EXPORT_NAME: disconnected), if the node filled up while it was
  negotiating: a client that connects early and negotiates slowly gets no slot it did not
  have (nbdkit checks again in .open for that reason).

Params: `limit` (clients at once; default 1; 0: no limit). Live: a change applies to the next
client; those connected stay.

Example: `nbdfabric node limit limit=1 --upstream nbd+unix:///?socket=disk.sock`: one client
at a time writes to the disk.

Differences from nbdkit 1.32: a client that asks for the export while the node is full is
refused its NBD_OPT_SET_META_CONTEXT too (nbdkit answers that one and refuses the NBD_OPT_GO
that follows). Between that check and the end of the client's handshake a few more turns of the
event loop pass: a client that wins that race is disconnected just after the handshake instead.
(`--max-connections N` on any node closes the (N+1)th connection at once, handshake or not.)
"""

from __future__ import annotations

import errno
from typing import Any

from ..base import Backend, Filter, current_client
from ..params import Params, live
from ..registry import register

#: nbdkit reads the limit as an unsigned int.
MAX_LIMIT = 2**32 - 1


class LimitParams(Params):
    limit: int = live(1, "clients connected at once (0: no limit)", ge=0, le=MAX_LIMIT)


def _full() -> OSError:
    return OSError(errno.EBUSY, "limit: too many clients connected, connection rejected")


@register
class Limit(Filter):
    """Serves at most N clients at once; more are refused."""

    kind = "limit"
    passes_contexts = True  #: meta contexts pass through (see Filter)
    Params = LimitParams
    params: LimitParams

    def __init__(self, params: LimitParams, next: Backend) -> None:
        super().__init__(params, next)
        #: Clients between their handshake's end and their disconnection, by connection id.
        self.clients: set[int] = set()

    def _is_full(self) -> bool:
        limit = self.params.limit
        return limit > 0 and len(self.clients) >= limit

    async def preconnect(self) -> None:
        await self.next.preconnect()
        if self._is_full():
            raise _full()

    def export_size(self, export_name: str, size: int) -> int | None:
        # The handshake's lookup: a full node refuses the export (NBD_REP_ERR_UNKNOWN).
        if self._is_full():
            return None
        return self.next.export_size(export_name, size)

    async def open_connection(self) -> None:
        if self._is_full():  # filled up since the lookup: checked and counted in one step
            raise _full()
        self.clients.add(current_client.get().connection_id)
        await self.next.open_connection()

    async def close_connection(self) -> None:
        # Also after an open_connection() that failed: a client never counted is no loss.
        self.clients.discard(current_client.get().connection_id)
        await self.next.close_connection()

    def status(self) -> dict[str, Any]:
        return {**self.next.status(), "limit": {"connected": len(self.clients)}}
