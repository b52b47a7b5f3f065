"""info: a read-only disk whose content is information about the client (nbdkit-info-plugin).

`mode=exportname` (default): the disk is the export name the client asked for, as UTF-8 bytes
(size = its length; the default export "" is an empty disk). `mode=base64exportname`: the
export name is base64 and the disk is the decoded bytes (a name that is not base64 is refused
as an unknown export). `mode=address`: the client's address and port as text, `unix` for unix
sockets (host paths are not leaked). `mode=time`, `mode=uptime`, `mode=conntime`: 12 bytes,
seconds as a 64-bit and microseconds as a 32-bit big-endian integer, of wall-clock time, time
since the node started, and time since this client connected; read all 12 bytes in one request
to get a consistent value.

Params: `mode` (magic; exportname | base64exportname | address | time | uptime | conntime).

Example: `nbdfabric node info --listen unix:/tmp/i.sock`, then
`nbdsh -u 'nbd+unix:///hello?socket=/tmp/i.sock' -c 'print(h.pread(h.get_size(), 0))'`
prints `bytearray(b'hello')`.
"""

from __future__ import annotations

import base64
import binascii
import struct
import time
from typing import Literal

from ..base import Capabilities, ClientInfo, Holes, Plugin, Support, current_client
from ..params import Params, param
from ..registry import register

Mode = Literal["exportname", "base64exportname", "address", "time", "uptime", "conntime"]
_TIME_MODES = ("time", "uptime", "conntime")
_TIME = struct.Struct(">QI")  #: seconds, microseconds
#: Where a client's connection time is kept in its ClientInfo.extra.
_CONNECTED = "info.connected"


class InfoParams(Params):
    mode: Mode = param("exportname", description="what the disk shows about the client")


def _as_time(seconds: float) -> bytes:
    whole = int(seconds)
    return _TIME.pack(whole, int((seconds - whole) * 1_000_000))


@register
class Info(Plugin):
    """Read-only disk showing the export name, client address or times."""

    kind = "info"
    Params = InfoParams
    magic = "mode"
    params: InfoParams

    def __init__(self, params: InfoParams) -> None:
        super().__init__(params)
        self.started = time.monotonic()

    def capabilities(self) -> Capabilities:
        size = _TIME.size if self.params.mode in _TIME_MODES else 0
        return Capabilities(size=size, cache=Support.NATIVE, multi_conn=True)

    def export_size(self, export_name: str, size: int) -> int | None:
        client = current_client.get()
        if client.connection_id:  # a real client, not the node asking for its own caps
            client.extra.setdefault(_CONNECTED, time.monotonic())
        content = self.content(export_name, client)
        return None if content is None else len(content)

    def content(self, export_name: str, client: ClientInfo) -> bytes | None:
        """The disk this client sees, or None if its export name is not acceptable."""
        mode = self.params.mode
        if mode == "exportname":
            return export_name.encode()
        if mode == "base64exportname":
            try:
                return base64.b64decode(export_name, validate=True)
            except (binascii.Error, ValueError):
                return None
        if mode == "address":
            return client.address.encode()
        if mode == "time":
            return _as_time(time.time())
        if mode == "uptime":
            return _as_time(time.monotonic() - self.started)
        connected = client.extra.get(_CONNECTED, time.monotonic())
        return _as_time(time.monotonic() - connected)

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        client = current_client.get()
        content = self.content(client.export_name, client) or b""
        piece = content[offset : offset + len(buf)]
        buf[: len(piece)] = piece
        # The server bounds reads by the size from export_size, so this is only a safety net.
        return [(len(piece), len(buf) - len(piece))] if len(piece) < len(buf) else None

    async def cache(self, count: int, offset: int, flags: int) -> None:
        pass
