"""gRPC on every node: the NodeService servicer, grpc.health.v1 kept in step with the node, and
server reflection, all served by grpc.aio on the node's own event loop (asyncio or uvloop).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import inspect
import json
import logging
import math
import os
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from ..server.addresses import AddressError, open_listener, parse_address, remove_socket_file
from ..server.node import ConfigError, Event, NodeRuntime
from ..server.poll import POLLER
from ..stats import LATENCY_BUCKETS
from .rpc.nbdfabric.v1 import node_pb2 as pb
from .rpc.nbdfabric.v1 import node_pb2_grpc as pb_grpc

log = logging.getLogger("nbdfabric.control")

NODE_SERVICE = pb.DESCRIPTOR.services_by_name["NodeService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
#: How often health is re-derived from runtime.healthy() besides on every node event.
HEALTH_INTERVAL = 0.5

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

#: The node's lifecycle states by name (NodeRuntime.state) and as NodeState.
STATES = {
    "starting": pb.NODE_STATE_STARTING,
    "serving": pb.NODE_STATE_SERVING,
    "paused": pb.NODE_STATE_PAUSED,
    "draining": pb.NODE_STATE_DRAINING,
    "stopped": pb.NODE_STATE_STOPPED,
}
_ROLES = {"plugin": pb.NODE_ROLE_PLUGIN, "filter": pb.NODE_ROLE_FILTER, "fan": pb.NODE_ROLE_FAN}
_SUPPORT = {0: pb.SUPPORT_LEVEL_NONE, 1: pb.SUPPORT_LEVEL_EMULATE, 2: pb.SUPPORT_LEVEL_NATIVE}
#: Upstream/member states that mean "usable" when the backend does not say `healthy` itself.
_GOOD_STATES = {"connected", "ok", "up", "healthy", "serving", "online", "active", "synced"}
#: Errnos that mean "try again later" rather than "something broke".
_TRANSIENT = {errno.ESHUTDOWN, errno.ECONNREFUSED, errno.ECONNRESET, errno.ENOTCONN,
              errno.EPIPE, errno.ETIMEDOUT, errno.EAGAIN}  # fmt: skip

_background: set[asyncio.Task[Any]] = set()  # strong references to fire-and-forget tasks


def _spawn(coro: Awaitable[Any]) -> asyncio.Task[Any]:
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("nbdfabric")
    except PackageNotFoundError:
        return "unknown"


def event_loop_name() -> str:
    loop = asyncio.get_running_loop()
    module = type(loop).__module__.split(".")[0]
    return "uvloop" if module == "uvloop" else "asyncio"


# Conversions ---------------------------------------------------------------------------------


def text(value: Any) -> str:
    """A param value as a person would type it back (floats without exponents)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.9f}".rstrip("0").rstrip(".") or "0"
    return str(value)


def to_json(value: Any) -> str:
    return json.dumps(value, default=str, sort_keys=True)


def param_messages(runtime: NodeRuntime) -> list[pb.Param]:
    return [
        pb.Param(
            name=p["name"],
            type=p["type"],
            value=text(p.get("value")),
            default_value=text(p.get("default")),
            required=bool(p.get("required")),
            live=bool(p.get("live")),
            help=p.get("help") or "",
        )
        for p in runtime.params_info()
    ]


def _entry_healthy(entry: dict[str, Any]) -> bool:
    if "healthy" in entry:
        return bool(entry["healthy"])
    return str(entry.get("state", "")).lower() in _GOOD_STATES


def _entry_detail(entry: dict[str, Any]) -> str:
    rest = {k: v for k, v in entry.items() if k not in ("index", "uri", "state", "healthy")}
    return to_json(rest)


def upstream_messages(status: dict[str, Any]) -> list[pb.Upstream]:
    """Typed entries from a backend status: `upstreams` (filters, via nodes.upstream) and
    `members` (fans), or a single `upstream` object."""
    entries: list[dict[str, Any]] = []
    for key in ("upstreams", "members"):
        value = status.get(key)
        if isinstance(value, list):
            entries += [e for e in value if isinstance(e, dict)]
    if not entries and isinstance(status.get("upstream"), dict):
        entries.append(status["upstream"])
    return [
        pb.Upstream(
            index=int(e.get("index", i)),
            uri=str(e.get("uri", "")),
            state=str(e.get("state", "")),
            healthy=_entry_healthy(e),
            detail_json=_entry_detail(e),
        )
        for i, e in enumerate(entries)
    ]


def member_messages(members: list[dict[str, Any]]) -> list[pb.Member]:
    return [
        pb.Member(
            index=int(m.get("index", i)),
            uri=str(m.get("uri", "")),
            state=str(m.get("state", "")),
            healthy=_entry_healthy(m),
            detail_json=_entry_detail(m),
        )
        for i, m in enumerate(members)
    ]


_PROGRESS_KEYS = ("running", "member", "done_bytes", "total_bytes", "throttle", "rate")


def progress_message(progress: dict[str, Any] | None) -> pb.RebuildProgress:
    p = progress or {}
    msg = pb.RebuildProgress(
        running=bool(p.get("running")),
        # The fans say bytes_done/bytes_total; done_bytes/total_bytes is also accepted.
        done_bytes=int(p.get("bytes_done") or p.get("done_bytes") or 0),
        total_bytes=int(p.get("bytes_total") or p.get("total_bytes") or 0),
        throttle_bytes_per_second=int(p.get("throttle") or 0),
        rate_bytes_per_second=float(p.get("rate") or 0.0),
        detail_json=to_json({k: v for k, v in p.items() if k not in _PROGRESS_KEYS}),
    )
    if p.get("member") is not None:
        msg.member_index = int(p["member"])
    return msg


def event_message(event: Event) -> pb.Event:
    ts = Timestamp()
    ts.FromNanoseconds(int(event.time * 1e9))
    return pb.Event(
        kind=event.kind, message=event.message, time=ts, detail_json=to_json(event.detail)
    )


# Errors --------------------------------------------------------------------------------------

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The gRPC status for an exception from the node or its backend (None: not ours)."""
    if isinstance(exc, ConfigError):
        code = grpc.StatusCode.FAILED_PRECONDITION if exc.code == "not_live" else None
        return code or grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, OSError):
        code = grpc.StatusCode.UNAVAILABLE if exc.errno in _TRANSIENT else grpc.StatusCode.INTERNAL
        name = errno.errorcode.get(exc.errno or 0, "")
        return code, f"{name + ': ' if name else ''}{exc.strerror or exc}"
    if isinstance(exc, IndexError | KeyError | ValueError | TypeError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, RuntimeError | NotImplementedError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    return None


def rpc(method: F) -> F:
    """Translate node exceptions into gRPC status codes, once, at the boundary."""

    @functools.wraps(method)
    async def wrapper(self: NodeServicer, request: Any, context: Any) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            mapped = status_for(exc)
            if mapped is None:
                log.exception("%s failed", method.__name__)
                raise
            await context.abort(mapped[0], f"{method.__name__}: {mapped[1]}")

    return wrapper  # type: ignore[return-value]


# The servicer --------------------------------------------------------------------------------


class NodeServicer(pb_grpc.NodeServiceServicer):  # type: ignore[misc]
    def __init__(self, runtime: NodeRuntime, health: NodeHealth) -> None:
        self.runtime = runtime
        self.health = health

    @rpc
    async def GetInfo(self, request: pb.GetInfoRequest, context: Any) -> pb.GetInfoResponse:
        rt = self.runtime
        backend = rt.backend
        info = rt.export_info()
        caps = rt.caps
        try:
            status = backend.status()
        except Exception as exc:  # a broken status must not hide the rest of the info
            status = {"error": f"status failed: {exc}"}
        return pb.GetInfoResponse(
            kind=backend.kind,
            role=_ROLES.get(backend.role, pb.NODE_ROLE_UNSPECIFIED),
            version=version(),
            state=STATES.get(rt.state, pb.NODE_STATE_UNSPECIFIED),
            healthy=self.health.derive() == SERVING,
            params=param_messages(rt),
            export_name=rt.options.export_name,
            description=rt.options.description,
            size=info.size,
            capabilities=pb.Capabilities(
                writable=caps.writable,
                flush=caps.flush,
                fua=_SUPPORT[int(caps.fua)],
                trim=caps.trim,
                zero=_SUPPORT[int(caps.zero)],
                fast_zero=caps.fast_zero,
                cache=_SUPPORT[int(caps.cache)],
                extents=caps.extents,
                multi_conn=caps.multi_conn,
                rotational=caps.rotational,
            ),
            block_sizes=pb.BlockSizes(
                minimum=info.block_min, preferred=info.block_preferred, maximum=info.block_max
            ),
            uris=rt.uris(),
            upstreams=upstream_messages(status if isinstance(status, dict) else {}),
            status_json=to_json(status),
            read_only=not caps.writable,
            pid=os.getpid(),
            uptime_seconds=time.time() - rt.stats.started,
            event_loop=event_loop_name(),
            polling=pb.Polling(**POLLER.info()),
            serves_several=rt.multi_export,
            exports=[pb.ListedExport(name=n, description=d) for n, d in rt.listed_exports()],
        )

    @rpc
    async def GetStats(self, request: pb.GetStatsRequest, context: Any) -> pb.GetStatsResponse:
        s = self.runtime.stats
        return pb.GetStatsResponse(
            pid=os.getpid(),
            ops=[
                pb.OpStats(
                    op=name,
                    count=op.count,
                    bytes=op.bytes,
                    errors=op.errors,
                    latency_sum_seconds=op.latency_sum,
                    latency_buckets=list(op.buckets),
                )
                for name, op in s.ops.items()
            ],
            connections_total=s.connections_total,
            connections_open=max(s.connections_open, 0),
            in_flight=max(s.in_flight, 0),
            protocol_errors=s.protocol_errors,
            uptime_seconds=time.time() - s.started,
            latency_bounds_seconds=list(LATENCY_BUCKETS),
        )

    @rpc
    async def Configure(self, request: pb.ConfigureRequest, context: Any) -> pb.ConfigureResponse:
        if self.runtime.draining:
            raise ConfigError("the node is shutting down", code="not_live")
        self.runtime.configure(dict(request.changes))
        return pb.ConfigureResponse(params=param_messages(self.runtime))

    @rpc
    async def Pause(self, request: pb.PauseRequest, context: Any) -> pb.PauseResponse:
        await self.runtime.pause(flush=request.flush)  # RuntimeError while it shuts down
        return pb.PauseResponse()

    @rpc
    async def Resume(self, request: pb.ResumeRequest, context: Any) -> pb.ResumeResponse:
        self.runtime.resume()
        return pb.ResumeResponse()

    @rpc
    async def Flush(self, request: pb.FlushRequest, context: Any) -> pb.FlushResponse:
        rt = self.runtime
        if not rt.caps.flush:
            raise RuntimeError(f"{rt.backend.kind} does not support flush (nothing to flush)")
        await rt.backend.flush(0)
        return pb.FlushResponse()

    @rpc
    async def Shutdown(self, request: pb.ShutdownRequest, context: Any) -> pb.ShutdownResponse:
        rt = self.runtime
        # nan compared false with both tests; inf waited forever for requests in flight
        if not math.isfinite(request.grace_seconds) or request.grace_seconds < 0:
            raise ValueError(
                f"grace_seconds must be 0 or more seconds, not {request.grace_seconds}"
            )
        if request.grace_seconds > 0:
            rt.options.shutdown_grace = request.grace_seconds
        await self.health.enter_graceful_shutdown()
        # After this reply is on its way: drain, flush, stop; run.py then stops this server.
        asyncio.get_running_loop().call_soon(_spawn, rt.shutdown())
        return pb.ShutdownResponse()

    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: Any
    ) -> AsyncIterator[pb.WatchEventsResponse]:
        rt = self.runtime
        queue = rt.subscribe()
        try:
            if request.send_current_state:
                yield pb.WatchEventsResponse(event=event_message(Event("state", rt.state)))
            if rt.stopped.is_set():
                return
            while True:
                event = await queue.get()
                yield pb.WatchEventsResponse(event=event_message(event))
                if event.kind == "state" and event.message == "stopped":
                    return
        finally:
            rt.unsubscribe(queue)

    # Fans ------------------------------------------------------------------------------------

    async def _fan(self, context: Any, name: str) -> Callable[..., Any]:
        backend = self.runtime.backend
        method = getattr(backend, name, None)
        if method is None:
            if backend.role != "fan":
                why = f"{backend.kind} is a {backend.role}, not a fan: it has no members"
            else:
                why = f"the {backend.kind} fan does not support {name}()"
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, why)  # raises
        return cast(Callable[..., Any], method)

    async def _members(self, context: Any) -> list[pb.Member]:
        members_info = await self._fan(context, "members_info")
        return member_messages(list(members_info()))

    async def _check_index(self, context: Any, index: int) -> None:
        count = len(await self._members(context))
        if not 0 <= index < count:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"member index {index} is out of range: "
                f"the {self.runtime.backend.kind} has {count} members (0-{count - 1})",
            )

    async def _progress(self) -> pb.RebuildProgress:
        get = getattr(self.runtime.backend, "rebuild_progress", None)
        return progress_message(await _maybe_await(get()) if get else None)

    @rpc
    async def ListMembers(
        self, request: pb.ListMembersRequest, context: Any
    ) -> pb.ListMembersResponse:
        members = await self._members(context)
        return pb.ListMembersResponse(members=members, rebuild=await self._progress())

    @rpc
    async def ReplaceMember(
        self, request: pb.ReplaceMemberRequest, context: Any
    ) -> pb.ReplaceMemberResponse:
        replace = await self._fan(context, "replace_member")
        if not request.uri:
            raise ValueError("give the NBD URI of the new member")
        await self._check_index(context, request.index)
        try:
            await _maybe_await(replace(request.index, request.uri))
        except OSError as exc:
            # The new member cannot be reached: the request cannot be carried out as things
            # are (INTERNAL said the node broke; UNAVAILABLE would read as "node unreachable").
            raise RuntimeError(f"cannot use {request.uri} as member {request.index}: "
                               f"{exc.strerror or exc}") from None  # fmt: skip
        return pb.ReplaceMemberResponse(members=await self._members(context))

    async def _on_member(self, context: Any, method: str, index: int) -> list[pb.Member]:
        """Call the fan's `method` on member `index`; the members as they are afterwards."""
        call = await self._fan(context, method)
        await self._check_index(context, index)
        await _maybe_await(call(index))
        return await self._members(context)

    @rpc
    async def MarkMemberFaulty(
        self, request: pb.MarkMemberFaultyRequest, context: Any
    ) -> pb.MarkMemberFaultyResponse:
        members = await self._on_member(context, "mark_faulty", request.index)
        return pb.MarkMemberFaultyResponse(members=members)

    @rpc
    async def TrustMember(
        self, request: pb.TrustMemberRequest, context: Any
    ) -> pb.TrustMemberResponse:
        members = await self._on_member(context, "trust_member", request.index)
        return pb.TrustMemberResponse(members=members)

    @rpc
    async def SetRebuild(
        self, request: pb.SetRebuildRequest, context: Any
    ) -> pb.SetRebuildResponse:
        set_rebuild = await self._fan(context, "set_rebuild")
        running = {pb.REBUILD_ACTION_START: True, pb.REBUILD_ACTION_STOP: False}.get(request.action)
        throttle = (
            request.throttle_bytes_per_second
            if request.HasField("throttle_bytes_per_second")
            else None
        )
        await _maybe_await(set_rebuild(running, throttle))
        return pb.SetRebuildResponse(progress=await self._progress())

    async def WatchRebuild(
        self, request: pb.WatchRebuildRequest, context: Any
    ) -> AsyncIterator[pb.WatchRebuildResponse]:
        await self._fan(context, "rebuild_progress")
        interval = request.interval_seconds if request.interval_seconds > 0 else 0.5
        last: pb.RebuildProgress | None = None
        while True:
            progress = await self._progress()
            if progress != last:
                yield pb.WatchRebuildResponse(progress=progress)
                last = progress
            if self.runtime.stopped.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.runtime.stopped.wait(), interval)


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


# Health --------------------------------------------------------------------------------------


class HealthBase(HealthServicer):  # type: ignore[misc]
    """grpc.health.v1 for a set of service names that share one status.

    Watch is re-implemented: the library's version forgets a service's condition when any one
    watcher leaves, so the other watchers of that service would miss every later change; and
    here watch streams end (after NOT_SERVING) when the node stops, so shutdown is not held up.
    """

    def __init__(self, services: list[str], status: int) -> None:
        super().__init__()
        self.services = services
        self.closed = False
        self._server_status.clear()
        for service in services:
            self._server_status[service] = status

    async def set_all(self, status: int) -> None:
        for service in self.services:
            if self._server_status.get(service) != status:
                await self.set(service, status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        condition = self._server_watchers[request.service]
        last = None
        while True:
            status = self._server_status.get(
                request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            )
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            if self.closed:
                return
            async with condition:
                if self._server_status.get(request.service) == last and not self.closed:
                    await condition.wait()

    async def close(self) -> None:
        self.closed = True
        for condition in list(self._server_watchers.values()):
            async with condition:
                condition.notify_all()


class NodeHealth(HealthBase):
    """grpc.health.v1 for the node ("" and the export name), derived from the runtime."""

    def __init__(self, runtime: NodeRuntime, services: list[str]) -> None:
        self.runtime = runtime
        super().__init__(services, int(NOT_SERVING))
        self._server_status.update({service: self.derive() for service in services})

    def derive(self) -> int:
        if self._gracefully_shutting_down:
            return int(NOT_SERVING)
        try:
            ok = self.runtime.healthy()
        except Exception as exc:
            log.warning("health check failed: %s", exc)
            ok = False
        return int(SERVING if ok else NOT_SERVING)

    async def refresh(self) -> None:
        await self.set_all(self.derive())

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> Any:
        """The status now, not as of the last event keep() has handled: a probe that follows a
        change (a member just marked faulty) must not be told the state before it."""
        if not self.closed:
            await self.refresh()
        return await super().Check(request, context)

    async def keep(self) -> None:
        """Follow the node: on each event and every HEALTH_INTERVAL, re-derive the status."""
        rt = self.runtime
        queue = rt.subscribe()
        try:
            while not rt.stopped.is_set():
                await self.refresh()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(queue.get(), HEALTH_INTERVAL)
                while not queue.empty():
                    queue.get_nowait()
            await self.enter_graceful_shutdown()
        finally:
            rt.unsubscribe(queue)
            await self.close()


# Serving -------------------------------------------------------------------------------------


def bind_target(addr: str) -> tuple[str, str | None]:
    """The gRPC bind target for `HOST:PORT`, `[::1]:PORT` or `unix:PATH` (and the unix path)."""
    address = parse_address(addr, default_port=0)
    if address.kind == "unix":
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(address.path).st_mode):
                os.unlink(address.path)  # a stale socket from an earlier run
        return f"unix:{address.path}", address.path
    if address.kind != "tcp":
        raise ValueError(f"--control {addr}: use HOST:PORT, [IPV6]:PORT or unix:PATH for gRPC")
    host = address.host
    return (f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"), None


def _try_bind(addr: str) -> None:
    """Bind `addr` once ourselves and let go, so that an address in use, a missing directory or
    an unknown host is said as for --listen. gRPC's own failure is a C-core log line on stderr
    and 'Failed to bind to address ...; set GRPC_VERBOSITY=debug ...', without the reason."""
    address = parse_address(addr, default_port=0)
    try:
        sock = open_listener(address)
    except AddressError as exc:
        raise OSError(errno.EADDRNOTAVAIL, f"--control: {exc}") from None
    sock.close()
    remove_socket_file(address)


def health_services(export_name: str) -> list[str]:
    """The names grpc.health.v1 answers for: "", the export's name, and the NodeService."""
    return ["", *([export_name] if export_name else []), NODE_SERVICE]


async def serve_node_service(
    addr: str, servicer: Any, health: HealthBase, reflection: bool
) -> tuple[grpc.aio.Server, str]:
    """Serve `servicer` (NodeService), `health` and (unless disabled) reflection on `addr`;
    returns the started server and the address it really listens on (the port when 0 was
    asked). Shared by a node's own endpoint and the one over --workers (fanin.py)."""
    target, path = bind_target(addr)
    # No SO_REUSEPORT: a second node on the same port must fail, not share it silently.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_NodeServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if reflection:
        from grpc_reflection.v1alpha import reflection as grpc_reflection

        grpc_reflection.enable_server_reflection(
            [NODE_SERVICE, HEALTH_SERVICE, grpc_reflection.SERVICE_NAME], server
        )
    _try_bind(addr)
    try:
        port = server.add_insecure_port(target)
    except RuntimeError as exc:
        raise OSError(errno.EADDRNOTAVAIL, f"--control {addr}: cannot listen: {exc}") from None
    if path is None and port == 0:
        raise OSError(errno.EADDRINUSE, f"--control {addr}: cannot listen (address in use?)")
    await server.start()
    if path is not None:
        return server, f"unix:{path}"
    return server, f"{target.rsplit(':', 1)[0]}:{port}"


async def start_control(
    runtime: NodeRuntime, addr: str, reflection: bool = True
) -> tuple[grpc.aio.Server, str]:
    """Serve NodeService, health and (unless disabled) reflection on `addr`; returns the
    started server and the address it really listens on (the port when 0 was asked)."""
    health = NodeHealth(runtime, health_services(runtime.options.export_name))
    server, bound = await serve_node_service(
        addr, NodeServicer(runtime, health), health, reflection
    )
    _spawn(health.keep())
    log.info("control on %s (%s)", bound, event_loop_name())
    return server, bound
