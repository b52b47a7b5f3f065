"""noparallel: handle requests one at a time, or clients one at a time (nbdkit-noparallel-filter).

For measuring what parallelism is worth, working around an upstream that mishandles parallel
requests, or serving a client that sends several requests at once but cannot take replies out
of order.

Params: `serialize` (alias `serialise`) =
    `requests` (default): one request at a time per client; each client's requests run in the
        order they came and are answered in that order. Clients still run side by side.
    `all-requests` (alias `all_requests`): one request at a time in the whole node, whichever
        client sent it (and so also in order per client).
    `connections`: one client at a time, its requests one at a time. A client that connects
        while another is served waits, its connection accepted but not greeted, until the
        other disconnects (as nbdkit's thread model SERIALIZE_CONNECTIONS makes it wait), and
        multi-conn is not advertised.

Example: `nbdfabric node noparallel serialize=all-requests --upstream nbd+unix:///?socket=d.sock`

Only this node's requests are serialized: the node's upstream connection and the nodes further
up keep their own parallelism. A request the node does in several steps (an emulated FUA write
and its flush, a WRITE_ZEROES written as zeros) takes one turn per step: another client's
request may run between them. `--ordering serial` (any node) is the `requests` mode done by
the session itself: it reads no request before the one in flight is answered.

Differences from nbdkit 1.32: a client waiting for its turn in `connections` mode is not
bound by --handshake-limit until its turn comes (nbdkit has no such limit).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, model_validator

from ..base import Backend, Capabilities, Extents, Filter, Holes, current_client
from ..params import Params, param
from ..registry import register


def _mode_alias(value: Any) -> Any:
    return "all-requests" if value == "all_requests" else value


Serialize = Annotated[
    Literal["requests", "all-requests", "connections"], BeforeValidator(_mode_alias)
]


class NoparallelParams(Params):
    serialize: Serialize = param(
        "requests", "requests (per client) | all-requests (whole node) | connections"
    )

    spellings = ("serialise",)

    @model_validator(mode="before")
    @classmethod
    def _british(cls, data: Any) -> Any:
        if isinstance(data, dict) and "serialise" in data:
            data = dict(data)
            data.setdefault("serialize", data.pop("serialise"))
        return data


@register
class Noparallel(Filter):
    """Handles requests one at a time per client or per node, or clients one at a time."""

    kind = "noparallel"
    passes_contexts = True  #: meta contexts pass through (see Filter)
    Params = NoparallelParams
    params: NoparallelParams

    def __init__(self, params: NoparallelParams, next: Backend) -> None:
        super().__init__(params, next)
        self.per_client = params.serialize == "requests"
        #: all-requests and connections: the node's one turn for requests.
        self._node_turn = asyncio.Lock()
        #: requests: each client's turn, by connection id (made at its first request).
        self._client_turns: dict[int, asyncio.Lock] = {}
        #: connections: the one client served (taken in preconnect, given in connection_ended).
        self._client_slot = asyncio.Lock()

    def capabilities(self) -> Capabilities:
        up = self.next.capabilities()
        if self.params.serialize == "connections" and up.multi_conn:
            return replace(up, multi_conn=False)  # one client at a time: nothing to share
        return up

    # Clients ------------------------------------------------------------------------------

    async def preconnect(self) -> None:
        await self.next.preconnect()
        if self.params.serialize == "connections":
            await self._client_slot.acquire()

    async def connection_ended(self) -> None:
        try:
            await self.next.connection_ended()
        finally:
            if self.params.serialize == "connections":
                self._client_slot.release()

    async def close_connection(self) -> None:
        self._client_turns.pop(current_client.get().connection_id, None)
        await self.next.close_connection()

    def _turn(self) -> asyncio.Lock:
        if not self.per_client:
            return self._node_turn
        client = current_client.get().connection_id
        turn = self._client_turns.get(client)
        if turn is None:
            turn = self._client_turns[client] = asyncio.Lock()
        return turn

    # Requests, each in its turn -----------------------------------------------------------

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        async with self._turn():
            return await self.next.pread(buf, offset, flags)

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        async with self._turn():
            await self.next.pwrite(buf, offset, flags)

    async def flush(self, flags: int) -> None:
        async with self._turn():
            await self.next.flush(flags)

    async def trim(self, count: int, offset: int, flags: int) -> None:
        async with self._turn():
            await self.next.trim(count, offset, flags)

    async def zero(self, count: int, offset: int, flags: int) -> None:
        async with self._turn():
            await self.next.zero(count, offset, flags)

    async def cache(self, count: int, offset: int, flags: int) -> None:
        async with self._turn():
            await self.next.cache(count, offset, flags)

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        async with self._turn():
            return await self.next.extents(count, offset, flags)

    async def context_extents(self, context: str, count: int, offset: int, flags: int) -> Extents:
        async with self._turn():
            return await self.next.context_extents(context, count, offset, flags)
