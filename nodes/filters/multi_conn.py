"""multi-conn: enable, emulate or disable multi-conn, and skip flushes nothing needs
(nbdkit-multi-conn-filter).

NBD_FLAG_CAN_MULTI_CONN tells a client that a flush on one of its connections makes every
write it saw completed, on any connection, visible to every connection (and durable): a write
on A, a flush on B, then a read on C sees the write. Clients that see it open several
connections (nbdcopy opens four, qemu several); without it they must flush on each.

What "connection" means here: one node process serves every client of the node, with no cache
of its own per client, over one upstream (`--upstream`). That upstream is one NBD connection
unless it advertises multi-conn itself (then a few, which its multi-conn makes consistent). So
a flush from any client, passed upstream once, makes what every client wrote durable and
visible to all: within this node the flush consistency multi-conn promises is what every
client gets. What the modes decide is what the node advertises, and what is passed upstream:

`multi-conn-mode` =
    `auto` (default): `emulate` if the upstream does not advertise multi-conn, else `plugin`
        (nbdkit's rule; nbdkit's "thread model serializes connections" case cannot arise: a
        noparallel node upstream advertises no multi-conn, which is `emulate`).
    `emulate`: advertise multi-conn. nbdkit sends a client's flush to every connection's own
        plugin connection; here they all share the upstream, so the flush goes upstream once
        if any connection needed it (see `multi-conn-track-dirty`). A FUA write is done as a
        write and such a flush (FUA is advertised as emulated). A client cannot connect if the
        upstream cannot flush (NBD_REP_ERR_UNKNOWN, as nbdkit refuses it).
    `plugin`: advertise what the upstream advertises ("plugin" is nbdkit's name for the
        layer below); flushes go upstream as the client sent them, less those
        `multi-conn-track-dirty` skips.
    `unsafe`: advertise multi-conn whatever the upstream says; flushes as in `plugin`. (Here
        that is safe, for the reason above, unless the node is one of several serving the
        same upstream data.)
    `disable`: never advertise multi-conn (to test that a client then flushes each
        connection); flushes as in `plugin`.
`multi-conn-track-dirty` =
    `connection` (default; alias `conn`): a connection is dirty after it wrote, zeroed or
        trimmed, or read since another connection's flush; a flush that no connection needs
        (in `emulate`: no dirty connection; else: nothing written since the last flush) is
        answered at once without going upstream (a connection that wrote since and has gone
        leaves its writes to the next flush, whoever sends it).
    `fast`: one dirty bit for all connections: any write makes it dirty, any flush clean.
        Fewer flushes; in `plugin` mode over an upstream without multi-conn it may skip a flush
        a client needs to see another's writes (nbdkit's warning, which holds here only when
        the node's upstream connection is not the only one).
    `off`: every flush goes upstream.
`multi-conn-exportname` (alias `multi-conn-export-name`; default false): true tracks dirty
    connections per export name, as if clients that asked for different names used different
    data. They do not here (a filter node serves its one upstream export under any name), so
    true only lets one name's flush skip another name's writes: the unsafe case nbdkit's
    manual warns of.

Example: `nbdfabric node multi-conn multi-conn-mode=emulate --upstream
nbd+unix:///?socket=disk.sock` lets nbdcopy use four connections to a disk whose server does
not advertise multi-conn; `multi-conn-mode=plugin multi-conn-track-dirty=fast` spares an
expensive upstream the flushes of a client that flushes every connection.

Differences from nbdkit 1.32: in `emulate` a flush goes upstream at most once (nbdkit: once
per connection that needs it, all to the same data here). A flush is never skipped that a
write already replied to still needs (NBD_CMD_FLUSH covers them all), where nbdkit skips it:
after the connection that wrote left without flushing (nbdkit forgets its writes with it;
here the next flush of any connection goes upstream), after a write that was under way or
done while an earlier flush ran (nbdkit marks a write dirty when it starts and clears the
marks when the flush ends; here a write is marked when done, a flush clears before it starts
and leaves the next one owed if it fails). The flush-capability check runs in each client's
handshake, as nbdkit's; a client refused so is refused its NBD_OPT_SET_META_CONTEXT too
(nbdkit refuses only the NBD_OPT_GO/INFO).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, model_validator

from ..base import Backend, Capabilities, Extents, Filter, Holes, Support, current_client
from ..params import Params, param
from ..protocol.constants import CmdFlag
from ..registry import register

log = logging.getLogger("nbdfabric.multi-conn")

_FUA = int(CmdFlag.FUA)
#: What may have left a connection's view stale: a write (or zero, trim), a read (or cache).
WRITE, READ = 1, 2

Mode = Literal["auto", "emulate", "plugin", "unsafe", "disable"]


def _track_alias(value: Any) -> Any:
    return "connection" if value == "conn" else value


Track = Annotated[Literal["connection", "fast", "off"], BeforeValidator(_track_alias)]


class MultiConnParams(Params):
    multi_conn_mode: Mode = param("auto", "auto | emulate | plugin | unsafe | disable")
    multi_conn_track_dirty: Track = param(
        "connection", "connection (alias conn) | fast | off: which flushes may be skipped"
    )
    multi_conn_exportname: bool = param(
        False, "track dirty connections per export name (alias multi-conn-export-name)"
    )

    spellings = ("multi-conn-export-name",)

    @model_validator(mode="before")
    @classmethod
    def _nbdkit_alias(cls, data: Any) -> Any:
        if isinstance(data, dict) and "multi-conn-export-name" in data:
            data = dict(data)
            data.setdefault("multi-conn-exportname", data.pop("multi-conn-export-name"))
        return data


@dataclass(eq=False)
class _Group:
    """The connections whose flushes answer for each other (all, or one export name's)."""

    name: str
    connections: list[_Connection] = field(default_factory=list)
    dirty: bool = False  #: a write since the last flush, on any of them


@dataclass(eq=False)
class _Connection:
    mode: Mode  #: auto resolved when the client opened
    group: _Group
    dirty: int = 0  #: WRITE | READ


@register
class MultiConn(Filter):
    """Enables, emulates or disables multi-conn, and skips flushes nothing needs."""

    kind = "multi-conn"
    passes_contexts = True  #: meta contexts pass through (see Filter)
    Params = MultiConnParams
    params: MultiConnParams

    def __init__(self, params: MultiConnParams, next: Backend) -> None:
        super().__init__(params, next)
        self.groups: dict[str, _Group] = {}
        self.connections: dict[int, _Connection] = {}  #: by connection id
        self.flushes_skipped = 0
        #: Writes of a group whose connections have all gone, no flush has covered yet: the
        #: next flush of any connection goes upstream (one upstream covers every group).
        self.owed = False

    def mode(self) -> Mode:
        """The mode, auto resolved by what the upstream advertises now."""
        mode = self.params.multi_conn_mode
        if mode == "auto":
            return "plugin" if self.next.capabilities().multi_conn else "emulate"
        return mode

    def capabilities(self) -> Capabilities:
        up = self.next.capabilities()
        mode = self.mode()
        multi_conn = up.multi_conn if mode == "plugin" else mode != "disable"
        fua = up.fua
        if mode == "emulate" and fua is Support.NATIVE:
            fua = Support.EMULATE  # a FUA write is a write and a flush of every connection
        return replace(up, multi_conn=multi_conn, fua=fua)

    def export_size(self, export_name: str, size: int) -> int | None:
        if self.mode() == "emulate" and not self.next.capabilities().flush:
            log.warning("multi-conn: emulating multi-conn requires working flush")
            return None  # the client is refused the export, as nbdkit's .prepare refuses it
        return self.next.export_size(export_name, size)

    # Connections --------------------------------------------------------------------------

    async def open_connection(self) -> None:
        await self.next.open_connection()
        client = current_client.get()
        name = client.export_name if self.params.multi_conn_exportname else ""
        group = self.groups.get(name)
        if group is None:
            group = self.groups[name] = _Group(name)
        conn = _Connection(self.mode(), group)
        group.connections.append(conn)
        self.connections[client.connection_id] = conn

    async def close_connection(self) -> None:
        conn = self.connections.pop(current_client.get().connection_id, None)
        if conn is not None:
            group = conn.group
            group.connections.remove(conn)
            if not group.connections:
                del self.groups[group.name]
                self.owed = self.owed or group.dirty
        await self.next.close_connection()

    def _connection(self) -> _Connection:
        conn = self.connections.get(current_client.get().connection_id)
        if conn is None:
            # A request from no client's connection (the node's flush at shutdown): a group
            # of its own, so it skips nothing it should not.
            conn = _Connection(self.mode(), _Group("", dirty=True), WRITE)
        return conn

    def _mark_dirty(self, conn: _Connection, write: bool) -> None:
        # No lock: a flush reads and clears the marks in one step, with no await between.
        track = self.params.multi_conn_track_dirty
        if track == "connection":
            conn.dirty |= WRITE if write else READ
        if track != "off" and write:
            conn.group.dirty = True

    # Requests -----------------------------------------------------------------------------

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        self._mark_dirty(self._connection(), False)
        return await self.next.pread(buf, offset, flags)

    async def cache(self, count: int, offset: int, flags: int) -> None:
        self._mark_dirty(self._connection(), False)
        await self.next.cache(count, offset, flags)

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        return await self.next.extents(count, offset, flags)

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        await self._write(functools.partial(self.next.pwrite, buf, offset), flags)

    async def zero(self, count: int, offset: int, flags: int) -> None:
        await self._write(functools.partial(self.next.zero, count, offset), flags)

    async def trim(self, count: int, offset: int, flags: int) -> None:
        await self._write(functools.partial(self.next.trim, count, offset), flags)

    async def _write(self, op: Callable[[int], Awaitable[None]], flags: int) -> None:
        """A write-side operation, given its flags, then the flush its connection owes
        (nbdkit's rule: a FUA write is durable by itself, so it leaves the connection clean,
        unless this filter emulates its FUA: then FUA comes off and the flush of every
        connection follows). The session emulates FUA in `emulate` mode (capabilities() says
        so), so that case arrives only from an in-process caller; the flush is the same
        either way. The connection is marked dirty once the write is done, not before (as
        nbdkit does): a flush that runs meanwhile does not cover it, and must not clear the
        mark."""
        conn = self._connection()
        fua = flags & _FUA
        emulated = bool(fua) and conn.mode == "emulate"
        try:
            await op(flags & ~_FUA if emulated else flags)
        finally:  # failed too: it may have written some of it
            if not fua or emulated:
                self._mark_dirty(conn, True)
        if emulated:
            await self._flush(conn, 0)

    async def flush(self, flags: int) -> None:
        await self._flush(self._connection(), flags)

    async def _flush(self, conn: _Connection, flags: int) -> None:
        if conn.mode == "emulate":
            await self._flush_emulated(conn, flags)
        else:
            await self._flush_passed_on(conn, flags)

    async def _flush_emulated(self, conn: _Connection, flags: int) -> None:
        """nbdkit flushes each connection of the group that needs it; they all share the
        upstream here, so it is flushed once if any does."""
        track, group = self.params.multi_conn_track_dirty, conn.group
        needing = [
            c
            for c in group.connections or [conn]
            if track == "off"
            or (group.dirty and (track == "fast" or c.dirty & READ))
            or c.dirty & WRITE
        ]
        # group.dirty with no connection needing it: the ones that wrote have gone.
        if not (needing or group.dirty or self.owed):
            self.flushes_skipped += 1
            return
        for c in needing:
            c.dirty = 0
        group.dirty = False
        await self._flush_upstream(flags)

    async def _flush_passed_on(self, conn: _Connection, flags: int) -> None:
        track, group = self.params.multi_conn_track_dirty, conn.group
        if track != "off" and not group.dirty and not self.owed:
            self.flushes_skipped += 1
            return  # nothing written since the last flush
        if track == "connection":
            if self.next.capabilities().multi_conn:
                for c in group.connections:
                    c.dirty = 0
                group.dirty = False
            else:
                conn.dirty = 0
        elif track == "fast":
            group.dirty = False
        await self._flush_upstream(flags)

    async def _flush_upstream(self, flags: int) -> None:
        """The flush, once the caller has marked clean what it covers: before, not after (as
        nbdkit does), so that a write done while it runs keeps its mark: this flush need not
        cover it, the next must."""
        self.owed = False
        try:
            await self.next.flush(flags)
        except BaseException:
            self.owed = True  # not flushed: the next flush, whoever sends it, goes upstream
            raise

    def status(self) -> dict[str, Any]:
        state = {
            "mode": self.mode(),
            "connections": len(self.connections),
            "flushes_skipped": self.flushes_skipped,
        }
        return {**self.next.status(), "multi_conn": state}
