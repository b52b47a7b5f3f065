"""A running node: one backend served on its listen addresses, with the state the control plane
sees and steers (stats, pause/resume, live configure, drain, events).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..base import Backend, Capabilities, ClientInfo
from ..params import field_info, live_names
from ..protocol.constants import DEFAULT_MAX_PAYLOAD, TFlag
from ..protocol.handshake import ExportInfo, HandshakePolicy, ListRefused, block_sizes
from ..protocol.transmission import MAX_DATA
from ..stats import NodeStats
from .addresses import (
    Address,
    bound_address,
    nbd_uri,
    open_listener,
    remove_socket_file,
    set_keepalive,
)
from .session import BufferPool, Export, Session
from .stream import SocketStream

log = logging.getLogger("nbdfabric.node")

#: Seconds between sweeps that give back the pages of read buffers with nothing in them. A
#: connection that idles returns its buffer's memory within this; a busy one that happens to be
#: between reads faults at most its buffer's pages in again (64, some 0.2 ms) each time.
IDLE_PAGES_SWEEP = 5.0


@dataclass
class NodeOptions:
    export_name: str = ""
    description: str = ""
    read_only: bool = False
    ordering: str = "parallel"  #: parallel | ordered | serial
    max_connections: int = 0  #: 0: unlimited
    structured_replies: bool = True
    eof_tolerant: bool = False
    tls: str = "off"  #: off | on | require
    tls_certificates: str | None = None
    tls_psk: str | None = None
    tls_verify_peer: bool = False
    keepalive_idle: int | None = None
    keepalive_interval: int | None = None
    keepalive_count: int | None = None
    shutdown_grace: float = 30.0
    #: Poll the sockets for up to this long before the loop sleeps (poll.py); 0: off.
    poll_max_us: int = 0
    #: Seconds a client has to finish negotiating (qemu-nbd's --handshake-limit); 0: no limit.
    handshake_limit: float = 10.0


def export_uris(addresses: Sequence[Address], options: NodeOptions) -> list[str]:
    """The NBD URIs clients use to reach the export on these addresses."""
    tls = options.tls == "require"
    return [nbd_uri(a, options.export_name, tls) for a in addresses]


@dataclass
class Event:
    kind: str  #: state | config | error | upstream | member
    message: str
    time: float = field(default_factory=time.time)
    detail: dict[str, Any] = field(default_factory=dict)


class ConfigError(ValueError):
    """A configure request that cannot be applied; `code` says why (for gRPC status codes)."""

    def __init__(self, message: str, code: str = "invalid") -> None:
        super().__init__(message)
        self.code = code  #: invalid | not_live


class NodeRuntime:
    def __init__(self, backend: Backend, options: NodeOptions) -> None:
        self.backend = backend
        self.options = options
        self.stats = NodeStats()
        self.pool = BufferPool()
        self.default_block_max = DEFAULT_MAX_PAYLOAD
        self.state = "starting"
        self.draining = False
        self.paused = False
        #: One future per request a pause holds: resume() answers each True (go on); a session
        #: whose client is gone answers its own False (dropped unserved: see Session._finish).
        self._holds: set[asyncio.Future[bool]] = set()
        self.sessions: set[Session] = set()
        self.listeners: list[socket.socket] = []
        #: Remove unix socket files at shutdown (not in a --workers worker: the first process does).
        self.owns_paths = True
        self.addresses: list[Address] = []
        self._accept_tasks: list[asyncio.Task[None]] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._session_tasks: set[asyncio.Task[None]] = set()
        self._subscribers: list[asyncio.Queue[Event]] = []
        self._next_id = 0
        self.tls_context: ssl.SSLContext | None = None
        self.stopped = asyncio.Event()
        self.caps = Capabilities(size=0)
        #: The backend serves several exports, chosen by name (file dir=; see Backend.exports).
        self.multi_export = False
        self._stop_task: asyncio.Task[None] | None = None
        backend.stop_node = self._stop_soon
        backend.read_only = options.read_only
        backend.node = self
        previous = getattr(backend, "emit", None)
        if previous is not None:
            # Fans report member and rebuild events through the node (and still to their own
            # hook: it logs them, or a test records them).
            def emit(kind: str, message: str, **detail: Any) -> None:
                previous(kind, message, **detail)
                self.emit(kind, message, **detail)

            backend.emit = emit  # type: ignore[attr-defined]

    # Lifecycle -----------------------------------------------------------------------------

    async def start(
        self, sockets: list[socket.socket] | None = None, listen: Sequence[Address] = ()
    ) -> None:
        await self.backend.start()
        try:
            self.multi_export = self.backend.exports() is not None
        except OSError:  # it lists its exports to nobody (exportname-list=error)
            self.multi_export = True
        if self.multi_export and self.options.export_name:
            await self.backend.stop()
            raise ValueError(
                f"--export-name {self.options.export_name!r}: this {self.backend.kind} node "
                "serves several exports, which clients choose by name (see NBD_OPT_LIST)"
            )
        self.refresh_caps()
        if self.options.tls != "off":
            from .tls import server_context

            self.tls_context = server_context(self.options)
        for sock in sockets or []:
            self._add_listener(sock)
        for addr in listen:
            self._add_listener(open_listener(addr))
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_idle_pages())
        self.set_state("serving")

    def refresh_caps(self) -> Capabilities:
        self.caps = self.export_caps(self.backend)
        return self.caps

    def export_caps(self, backend: Backend) -> Capabilities:
        """What a client is told: `backend`'s capabilities, with --read-only applied."""
        caps = backend.capabilities().normalized()
        if self.options.read_only and caps.writable:
            caps = replace(caps, writable=False).normalized()
        return caps

    def _add_listener(self, sock: socket.socket) -> None:
        self.listeners.append(sock)
        self.addresses.append(bound_address(sock))
        task = asyncio.get_running_loop().create_task(self._accept_loop(sock))
        self._accept_tasks.append(task)

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(lsock)
            except OSError as exc:
                if self.draining:
                    return
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            limit = self.options.max_connections
            if self.draining or (limit and len(self.sessions) >= limit):
                conn.close()
                continue
            try:
                session = self._new_session(conn, peer, lsock)
            except OSError as exc:
                # A peer that reset at once can make a socket option fail: that connection
                # is lost, never the listener.
                log.warning("connection dropped while setting it up: %s", exc)
                conn.close()
                continue
            task = loop.create_task(self._run_session(session))
            self._session_tasks.add(task)
            task.add_done_callback(self._session_tasks.discard)

    def _new_session(self, conn: socket.socket, peer: Any, lsock: socket.socket) -> Session:
        o = self.options
        set_keepalive(conn, o.keepalive_idle, o.keepalive_interval, o.keepalive_count)
        self._next_id += 1
        client = ClientInfo(address=_peer_text(peer, lsock), connection_id=self._next_id)
        return Session(self, SocketStream(conn), client)

    async def serve_single(self, conn: socket.socket) -> None:
        """Serve the one client on `conn` (`nbdfabric node -s`: stdin, a socket libnbd's
        connect_command made), then shut the node down."""
        try:
            session = self._new_session(conn, conn.getpeername(), conn)
        except OSError as exc:
            log.warning("the client on stdin is gone: %s", exc)
            conn.close()
        else:
            await self._run_session(session)
        await self.shutdown()

    async def _run_session(self, session: Session) -> None:
        self.sessions.add(session)
        self.stats.connections_total += 1
        self.stats.connections_open += 1
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            self.stats.connections_open -= 1

    async def _sweep_idle_pages(self) -> None:
        """Pages a connection's reads touched stay with it until given back: without this, a
        thousand clients that each once sent a burst and now idle would hold 256 MiB."""
        while True:
            await asyncio.sleep(IDLE_PAGES_SWEEP)
            for session in self.sessions:
                session.drop_idle_pages()

    def _stop_soon(self) -> None:
        """The backend asked for the node to stop (exitlast, exitwhen): as on SIGTERM."""
        if self._stop_task is None:
            self._stop_task = asyncio.get_running_loop().create_task(self.shutdown())

    async def shutdown(self) -> None:
        """Stop accepting, let requests in flight finish (later ones get ESHUTDOWN), flush,
        close every connection, stop the backend."""
        if self.draining:
            await self.stopped.wait()
            return
        self.draining = True
        self.set_state("draining")
        self.resume()
        for task in self._accept_tasks:
            task.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for sock in self.listeners:
            sock.close()
        for addr in self.addresses if self.owns_paths else ():
            remove_socket_file(addr)
        for session in list(self.sessions):
            session.begin_shutdown()
        try:
            await asyncio.wait_for(self.wait_idle(), self.options.shutdown_grace)
        except TimeoutError:
            log.warning(
                "shutdown: requests still in flight after %.0fs", self.options.shutdown_grace
            )
        if self.caps.writable and self.caps.flush:
            try:
                await self.backend.flush(0)
            except OSError as exc:
                log.warning("flush at shutdown failed: %s", exc)
        with contextlib.suppress(TimeoutError):  # replies still on their way out
            await asyncio.wait_for(
                asyncio.gather(*(s.drain() for s in self.sessions)), self.options.shutdown_grace
            )
        for session in list(self.sessions):
            session.closed = True
            session.stream.close()
        for task in list(self._session_tasks):
            task.cancel()
        await asyncio.gather(*self._session_tasks, return_exceptions=True)
        try:
            await self.backend.stop()
        except Exception as exc:
            log.warning("stopping the backend failed: %s", exc)
        self.set_state("stopped")
        self.stopped.set()

    # Handshake facts -----------------------------------------------------------------------

    def export_info(self) -> ExportInfo:
        """The node's own export (of a multi-export node: the node as a whole)."""
        caps = self.refresh_caps()
        return self._info(self.options.export_name, caps.size, Export(self.backend, caps))

    def _info(self, name: str, size: int, export: Export) -> ExportInfo:
        caps = export.caps
        # Never more than the session takes (MAX_DATA): an upstream that says 4G-1 (nbdkit's
        # default) would otherwise have us advertise what we then refuse.
        # block_sizes: what the backend said, made valid whatever it said (the session then
        # enforces what was advertised).
        block_min, block_preferred, block_max = block_sizes(
            caps.block_min,
            caps.block_preferred,
            min(caps.block_max or self.default_block_max, MAX_DATA),
        )
        return ExportInfo(
            name=name,
            size=size,
            tflags=caps.tflags(),
            description=self.options.description,
            block_min=block_min,
            block_preferred=block_preferred,
            block_max=block_max,
            handle=export,
            contexts=export.backend.contexts() if caps.extents else (),
        )

    def handshake_policy(self) -> HandshakePolicy:
        if self.multi_export:
            return HandshakePolicy(
                tls=self.options.tls,
                structured_replies=self.options.structured_replies,
                lookup=self._lookup_export,
                listing=self._list_exports,
                prepare=self.backend.prepares_exports,
            )
        name = self.options.export_name
        info = self.export_info()

        def lookup(requested: str) -> ExportInfo | None:
            stand_in = self.backend.for_client()
            if stand_in is not self.backend:  # whatever the name: nbdkit's tls-fallback
                return self._stand_in_export(requested or name, stand_in)
            # "" is the default export; without --export-name any name is accepted (nbdkit).
            if requested in ("", name) or not name:
                size = self.backend.export_size(requested or name, info.size)
                if size is None:
                    return None
                return replace(info, name=requested or name, size=size)
            return None

        return HandshakePolicy(
            tls=self.options.tls,
            structured_replies=self.options.structured_replies,
            lookup=lookup,
            listing=lambda: [info],
        )

    def _lookup_export(self, name: str) -> ExportInfo | None:
        """Of a multi-export node: the export `name`, from the backend that serves it now."""
        stand_in = self.backend.for_client()
        if stand_in is not self.backend:
            return self._stand_in_export(name, stand_in)
        try:
            backend = self.backend.for_export(name)
            if backend is None:
                return None
            caps = self.export_caps(backend)
        except OSError as exc:  # the client is refused, the node serves on
            log.warning("export %r: %s", name, exc)
            return None
        size = backend.export_size(name, caps.size)
        if size is None:
            return None
        canonical, description = backend.export_identity(name)
        info = self._info(canonical, size, Export(backend, caps))
        return replace(info, description=description) if description else info

    def _stand_in_export(self, name: str, backend: Backend) -> ExportInfo:
        """The export a client is served by the backend for_client() chose for it."""
        caps = self.export_caps(backend)
        return replace(self._info(name, caps.size, Export(backend, caps)), description="")

    async def prepare_export(self, name: str | None) -> None:
        """Before the handshake looks up export `name` (None: lists them), for a backend whose
        exports are opened or listed by waiting (Backend.prepare_export)."""
        try:
            await self.backend.prepare_export(name)
        except OSError as exc:  # the lookup that follows finds nothing: the client is told so
            log.warning("export %r: %s", name, exc)

    def listed_exports(self) -> list[tuple[str, str]]:
        """Of a multi-export node: (name, description) of each export it lists now (none if
        the listing is refused); of any other node, nothing."""
        if not self.multi_export:
            return []
        try:
            return [(i.name, i.description) for i in self._list_exports()]
        except ListRefused:
            return []

    def _list_exports(self) -> list[ExportInfo]:
        # NBD_OPT_LIST carries names and descriptions only: no file is opened for it.
        try:
            exports = self.backend.exports() or ()
        except OSError as exc:
            raise ListRefused(exc.strerror or str(exc)) from None
        return [
            ExportInfo(name, 0, TFlag(0), description or self.options.description)
            for name, description in exports
        ]

    # Control -------------------------------------------------------------------------------

    def uris(self) -> list[str]:
        return export_uris(self.addresses, self.options)

    def set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.emit("state", state)

    def emit(self, kind: str, message: str, **detail: Any) -> None:
        event = Event(kind, message, detail=detail)
        for queue in list(self._subscribers):
            if queue.qsize() < 1000:
                queue.put_nowait(event)

    def subscribe(self) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._subscribers.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers.remove(queue)

    def healthy(self) -> bool:
        return self.state in ("serving", "paused") and self.backend.healthy()

    @property
    def held(self) -> int:
        """Requests waiting for resume (counted in stats.in_flight too)."""
        return len(self._holds)

    async def pause(self, flush: bool = False) -> None:
        """New requests wait; returns once those in flight have finished (or a resume came
        meanwhile: there is no pause to report then). With flush, data is then made durable.
        Requests held by an earlier pause are not waited for: they cannot finish before resume."""
        if self.draining:
            raise RuntimeError("the node is shutting down; nothing to pause")
        self.paused = True
        self.set_state("paused")
        # Polled: in_flight changes on the hot path, which must not pay for telling us.
        while self.paused and self.stats.in_flight > self.held:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        if flush and self.paused and self.caps.flush:
            await self.backend.flush(0)

    def resume(self) -> None:
        self.paused = False
        holds, self._holds = self._holds, set()
        for hold in holds:
            if not hold.done():
                hold.set_result(True)
        if self.state == "paused":
            self.set_state("serving")

    async def wait_idle(self) -> None:
        """Return once no request is in flight (polled: in_flight changes on the hot path).
        Requests held by a pause do not count: they cannot finish before resume."""
        while self.stats.in_flight > self.held:  # noqa: ASYNC110
            await asyncio.sleep(0.005)

    async def wait_resumed(self, mine: set[asyncio.Future[bool]]) -> bool:
        """Hold a request (of the session whose holds are `mine`) until resume: True then.
        False if the session answered it first because its client is gone: the request is
        dropped unserved, nobody being there to take its reply."""
        hold = self.hold(mine)
        try:
            return await hold
        finally:
            self.unhold(hold, mine)

    def hold(self, mine: set[asyncio.Future[bool]]) -> asyncio.Future[bool]:
        """A held request's future, which resume (True) or its session (False) resolves; the
        caller counts the request in stats.in_flight while it is held, and calls unhold."""
        hold: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._holds.add(hold)
        mine.add(hold)
        return hold

    def unhold(self, hold: asyncio.Future[bool], mine: set[asyncio.Future[bool]]) -> None:
        self._holds.discard(hold)
        mine.discard(hold)

    def params_info(self) -> list[dict[str, Any]]:
        values = self.backend.params.shown()
        out = []
        for entry in field_info(type(self.backend.params)):
            out.append({**entry, "value": values.get(entry["name"])})
        return out

    def configure(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Apply live param changes atomically; ConfigError names the offending param."""
        from ..params import ParamError, did_you_mean

        model = type(self.backend.params)
        known = {e["name"] for e in field_info(model)}
        live = live_names(model)
        for key in changes:
            if key not in known:
                raise ConfigError(
                    f"{self.backend.kind}: unknown parameter '{key}'{did_you_mean(key, known)} "
                    f"(live ones: {', '.join(sorted(live)) or 'none'})"
                )
            if key not in live:
                raise ConfigError(
                    f"{self.backend.kind}: parameter '{key}' cannot change while the node "
                    f"serves (live ones: {', '.join(sorted(live)) or 'none'})",
                    code="not_live",
                )
        try:
            self.backend.configure(changes)
        except ParamError as exc:
            raise ConfigError(str(exc)) from None
        self.emit("config", ", ".join(f"{k}={v}" for k, v in changes.items()), **changes)
        return self.backend.params.model_dump(by_alias=True, mode="json")


def _peer_text(peer: Any, lsock: socket.socket) -> str:
    if lsock.family == socket.AF_UNIX:
        return "unix"
    if isinstance(peer, tuple):
        host, port = peer[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(peer)
