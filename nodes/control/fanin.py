"""gRPC control and metrics of a node served by several worker processes (`--workers N`).

Each worker serves the usual NodeService and health on a private unix socket. The node's control
process (forked by the supervisor, workers.py) serves the public `--control` and `--metrics`
addresses and answers for the node as a whole, from every worker:

- GetInfo: the first worker's answer, with the node's pid (the supervisor's), healthy only when
  every worker is, the node's state over the workers (draining once one drains or has stopped,
  else paused, else starting while one is being replaced, else serving), polls summed, and
  `workers` in the status (pid, state, health of each);
- GetStats: every counter and latency bucket summed. A worker that dies or is replaced still
  counts with what it had counted when last asked (requests it served after that are lost), so
  the node's counters do not go back; a replaced control process starts from the live workers;
- Configure: checked and applied by the first worker, then applied by the others;
- Pause, Resume, Flush, Shutdown: every worker (a worker told to shut down exits 0, and the
  supervisor then stops the node instead of replacing it);
- WatchEvents: every worker's events, with the worker's slot in the detail; a `state` event only
  when the node's state changes; the stream ends once every worker has stopped;
- grpc.health.v1: SERVING when every worker is;
- fan RPCs: the first worker answers (UNIMPLEMENTED: fans cannot have workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..stats import LATENCY_BUCKETS, NodeStats, OpStats
from .rpc.nbdfabric.v1 import node_pb2 as pb
from .rpc.nbdfabric.v1 import node_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from ..run import RunAs

from .server import (
    HEALTH_INTERVAL,
    NOT_SERVING,
    SERVING,
    STATES,
    HealthBase,
    event_loop_name,
    health_services,
    serve_node_service,
)

log = logging.getLogger("nbdfabric.control")

#: How long a worker may take to answer a question about itself.
ASK_TIMEOUT = 5.0
#: How long before a worker's event stream is opened again after it broke (a replaced worker).
REOPEN_DELAY = 0.2

T = TypeVar("T")

_STATE_NAMES: dict[int, str] = {value: name for name, value in STATES.items()}


def node_state(states: list[Any]) -> Any:
    """The node's state from its workers' (a worker that does not answer counts as starting)."""
    if states and all(s == pb.NODE_STATE_STOPPED for s in states):
        return pb.NODE_STATE_STOPPED
    if pb.NODE_STATE_STOPPED in states:  # workers only stop when the node does
        return pb.NODE_STATE_DRAINING
    for state in (pb.NODE_STATE_DRAINING, pb.NODE_STATE_PAUSED, pb.NODE_STATE_STARTING):
        if state in states:
            return state
    return pb.NODE_STATE_SERVING if states else pb.NODE_STATE_STARTING


class WorkerError(Exception):
    """A worker refused or could not be reached; carries its gRPC status."""

    def __init__(self, slot: int, error: grpc.aio.AioRpcError) -> None:
        super().__init__(f"worker {slot}: {error.details()}")
        self.code = error.code()
        self.details = error.details() or ""


class Workers:
    """Channels to every worker's private control socket, by slot."""

    def __init__(self, paths: list[str]) -> None:
        # A replaced worker is back within a second: retry soon, not after gRPC's default
        # back-off (which grows to two minutes).
        options = [("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 1000)]  # fmt: skip
        self.channels = [grpc.aio.insecure_channel(f"unix:{p}", options=options) for p in paths]
        self.nodes = [pb_grpc.NodeServiceStub(c) for c in self.channels]
        self.health = [health_pb2_grpc.HealthStub(c) for c in self.channels]

    async def ask(self, call: Callable[[Any], Awaitable[T]]) -> list[T | None]:
        """`call(stub)` on every worker at once; None where one did not answer."""

        async def one(stub: Any) -> T | None:
            try:
                return await call(stub)
            except grpc.aio.AioRpcError:
                return None

        return list(await asyncio.gather(*(one(s) for s in self.nodes)))

    async def tell(self, call: Callable[[Any], Awaitable[T]], first: bool = False) -> list[T]:
        """`call(stub)` on every worker (after the first alone when `first`: it checks the
        request for all); WorkerError from the first that refused."""
        results: list[T] = []
        stubs = list(enumerate(self.nodes))
        if first:
            results.append(await self._one(0, stubs[0][1], call))
            stubs = stubs[1:]
        results += await asyncio.gather(*(self._one(i, s, call) for i, s in stubs))
        return results

    @staticmethod
    async def _one(slot: int, stub: Any, call: Callable[[Any], Awaitable[T]]) -> T:
        try:
            return await call(stub)
        except grpc.aio.AioRpcError as exc:
            raise WorkerError(slot, exc) from None

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels), return_exceptions=True)


def merge_stats(answers: list[pb.GetStatsResponse]) -> pb.GetStatsResponse:
    out = pb.GetStatsResponse(latency_bounds_seconds=list(LATENCY_BUCKETS))
    ops: dict[str, pb.OpStats] = {}
    for answer in answers:
        out.connections_total += answer.connections_total
        out.connections_open += answer.connections_open
        out.in_flight += answer.in_flight
        out.protocol_errors += answer.protocol_errors
        out.uptime_seconds = max(out.uptime_seconds, answer.uptime_seconds)
        for op in answer.ops:
            total = ops.get(op.op)
            if total is None:
                total = ops[op.op] = pb.OpStats(
                    op=op.op, latency_buckets=[0] * len(op.latency_buckets)
                )
            total.count += op.count
            total.bytes += op.bytes
            total.errors += op.errors
            total.latency_sum_seconds += op.latency_sum_seconds
            for i, n in enumerate(op.latency_buckets):
                total.latency_buckets[i] += n
    out.ops.extend(ops.values())
    return out


def _counters_only(stats: pb.GetStatsResponse) -> pb.GetStatsResponse:
    """A copy without the gauges (open connections, requests in flight) of a worker gone."""
    out = pb.GetStatsResponse()
    out.CopyFrom(stats)
    out.connections_open = out.in_flight = 0
    return out


@dataclass
class FanIn:
    """What the control process knows: the workers, and the node they make together."""

    workers: Workers
    node_pid: int
    started: float
    stopping: bool = False
    #: The node as the metrics collector reads it (metrics.py), refreshed before each scrape.
    view: SimpleNamespace = field(default_factory=SimpleNamespace)
    #: Each worker's counters when last asked, and those of workers since replaced, so that the
    #: node's counters never go back when a worker is (Prometheus would take it for a reset).
    last: dict[int, pb.GetStatsResponse] = field(default_factory=dict)
    retired: pb.GetStatsResponse = field(default_factory=pb.GetStatsResponse)
    #: one stats() at a time: answers must be compared in the order they were asked for
    stats_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def info(self) -> pb.GetInfoResponse:
        answers = await self.workers.ask(
            lambda s: s.GetInfo(pb.GetInfoRequest(), timeout=ASK_TIMEOUT)
        )
        got = [a for a in answers if a is not None]
        if not got:
            raise WorkerError(0, _unavailable("no worker of this node answers"))
        info = pb.GetInfoResponse()
        info.CopyFrom(got[0])
        info.pid = self.node_pid
        info.uptime_seconds = time.time() - self.started
        info.healthy = len(got) == len(answers) and all(a.healthy for a in got)
        info.state = node_state([a.state if a is not None else pb.NODE_STATE_STARTING
                                 for a in answers])  # fmt: skip
        info.polling.hits = sum(a.polling.hits for a in got)
        info.polling.misses = sum(a.polling.misses for a in got)
        info.polling.sockets = sum(a.polling.sockets for a in got)
        info.polling.ns = max(a.polling.ns for a in got)
        # An upstream is as healthy as its worst connection (each worker has its own pool).
        for a in got:
            for i, up in enumerate(a.upstreams):
                if i < len(info.upstreams) and not up.healthy:
                    info.upstreams[i].CopyFrom(up)
        for i, up in enumerate(info.upstreams):
            _sum_relayed(up, [a.upstreams[i] for a in got if i < len(a.upstreams)])
        status = json.loads(info.status_json or "{}")
        if isinstance(status, dict):
            status["workers"] = [
                {"slot": slot, "state": "unreachable", "healthy": False}
                if a is None
                else {
                    "slot": slot,
                    "pid": a.pid,
                    "state": _STATE_NAMES.get(a.state, "unknown"),
                    "healthy": a.healthy,
                }
                for slot, a in enumerate(answers)
            ]
            info.status_json = json.dumps(status, sort_keys=True)
        return info

    async def stats(self) -> pb.GetStatsResponse:
        async with self.stats_lock:
            answers = await self.workers.ask(
                lambda s: s.GetStats(pb.GetStatsRequest(), timeout=ASK_TIMEOUT)
            )
            return self._count(answers)

    def _count(self, answers: list[pb.GetStatsResponse | None]) -> pb.GetStatsResponse:
        counted = []
        for slot, answer in enumerate(answers):
            before = self.last.get(slot)
            if answer is None:
                if before is not None:  # gone, not yet replaced: what it counted still counts
                    counted.append(_counters_only(before))
                continue
            # A new worker in this slot (another process; its uptime alone may already have
            # passed the old one's when the replacement took long): the old one's counts stay.
            if before is not None and answer.pid != before.pid:
                self.retired = merge_stats([self.retired, _counters_only(before)])
            self.last[slot] = answer
            counted.append(answer)
        merged = merge_stats([self.retired, *counted])
        merged.uptime_seconds = time.time() - self.started
        merged.pid = self.node_pid
        return merged

    async def serving(self) -> bool:
        answers = await asyncio.gather(
            *(
                h.Check(health_pb2.HealthCheckRequest(service=""), timeout=ASK_TIMEOUT)
                for h in self.workers.health
            ),
            return_exceptions=True,
        )
        return all(getattr(a, "status", None) == SERVING for a in answers)

    async def refresh_view(self) -> None:
        """Bring the metrics view up to date (metrics.py reads it like a NodeRuntime)."""
        try:
            info, stats = await asyncio.gather(self.info(), self.stats())
        except WorkerError:
            self.view.state, self.view.up = "starting", False
            return
        ops = {}
        for op in stats.ops:
            ops[op.op] = OpStats(op.count, op.bytes, op.errors, op.latency_sum_seconds,
                                 list(op.latency_buckets))  # fmt: skip
        self.view.backend = SimpleNamespace(kind=info.kind)
        self.view.options = SimpleNamespace(export_name=info.export_name)
        self.view.caps = SimpleNamespace(size=info.size)
        self.view.state = _STATE_NAMES.get(info.state, "starting")
        self.view.up = info.healthy
        self.view.stats = NodeStats(
            ops=ops,
            connections_total=stats.connections_total,
            connections_open=stats.connections_open,
            in_flight=stats.in_flight,
            protocol_errors=stats.protocol_errors,
            started=self.started,
        )
        self.view.healthy = lambda: bool(self.view.up)


def _unavailable(why: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details=why
    )


def _relay(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """A worker's refusal reaches the client with the worker's status code and words."""

    async def wrapper(self: FanInServicer, request: Any, context: Any) -> Any:
        try:
            return await method(self, request, context)
        except WorkerError as exc:
            await context.abort(exc.code, exc.details)

    wrapper.__name__ = method.__name__
    return wrapper


class FanInServicer(pb_grpc.NodeServiceServicer):  # type: ignore[misc]
    def __init__(self, fanin: FanIn, health: FanInHealth) -> None:
        self.fanin = fanin
        self.workers = fanin.workers
        self.health = health

    @_relay
    async def GetInfo(self, request: pb.GetInfoRequest, context: Any) -> pb.GetInfoResponse:
        return await self.fanin.info()

    @_relay
    async def GetStats(self, request: pb.GetStatsRequest, context: Any) -> pb.GetStatsResponse:
        return await self.fanin.stats()

    @_relay
    async def Configure(self, request: pb.ConfigureRequest, context: Any) -> pb.ConfigureResponse:
        answers = await self.workers.tell(lambda s: s.Configure(request), first=True)
        return answers[0]

    @_relay
    async def Pause(self, request: pb.PauseRequest, context: Any) -> pb.PauseResponse:
        await self.workers.tell(lambda s: s.Pause(request))
        return pb.PauseResponse()

    @_relay
    async def Resume(self, request: pb.ResumeRequest, context: Any) -> pb.ResumeResponse:
        await self.workers.tell(lambda s: s.Resume(request))
        return pb.ResumeResponse()

    @_relay
    async def Flush(self, request: pb.FlushRequest, context: Any) -> pb.FlushResponse:
        await self.workers.tell(lambda s: s.Flush(request))
        return pb.FlushResponse()

    @_relay
    async def Shutdown(self, request: pb.ShutdownRequest, context: Any) -> pb.ShutdownResponse:
        if request.grace_seconds < 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "Shutdown: grace_seconds cannot be negative"
            )
        self.fanin.stopping = True
        await self.health.enter_graceful_shutdown()
        # Every worker drains and exits 0; the supervisor then stops the node.
        await self.workers.ask(lambda s: s.Shutdown(request, timeout=ASK_TIMEOUT))
        return pb.ShutdownResponse()

    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: Any
    ) -> AsyncIterator[pb.WatchEventsResponse]:
        queue: asyncio.Queue[tuple[int, pb.Event | None]] = asyncio.Queue()
        readers = [
            asyncio.ensure_future(self._follow(slot, stub, queue))
            for slot, stub in enumerate(self.workers.nodes)
        ]
        states: dict[int, int] = {}
        live = set(range(len(readers)))
        last: int | None = None
        try:
            if request.send_current_state:
                with contextlib.suppress(WorkerError):
                    last = (await self.fanin.info()).state
                    yield _state_event(last)
            while live:
                slot, event = await queue.get()
                if event is None:
                    live.discard(slot)
                    states[slot] = pb.NODE_STATE_STOPPED
                    continue
                if event.kind != "state":
                    detail = json.loads(event.detail_json or "{}")
                    if isinstance(detail, dict):
                        detail["worker"] = slot
                        event.detail_json = json.dumps(detail, sort_keys=True)
                    yield pb.WatchEventsResponse(event=event)
                    continue
                states[slot] = STATES.get(event.message, pb.NODE_STATE_STARTING)
                now = node_state([states.get(s, pb.NODE_STATE_STARTING)
                                  for s in range(len(readers))])  # fmt: skip
                if now != last and now != pb.NODE_STATE_STOPPED:
                    last = now
                    yield pb.WatchEventsResponse(event=event_with_state(event, now))
            yield _state_event(pb.NODE_STATE_STOPPED)
        finally:
            for reader in readers:
                reader.cancel()

    async def _follow(
        self, slot: int, stub: Any, queue: asyncio.Queue[tuple[int, pb.Event | None]]
    ) -> None:
        """One worker's events into `queue`, then (slot, None) once it has stopped. A stream
        that breaks (a worker replaced) is opened again unless the node is stopping."""
        while True:
            stopped = False
            call = stub.WatchEvents(pb.WatchEventsRequest())
            try:
                async for answer in call:
                    event = answer.event
                    await queue.put((slot, event))
                    stopped = event.kind == "state" and event.message == "stopped"
            except grpc.aio.AioRpcError:
                pass
            finally:
                call.cancel()  # the client left (this task is cancelled): so does the stream
            if stopped or self.fanin.stopping:
                await queue.put((slot, None))
                return
            await asyncio.sleep(REOPEN_DELAY)

    async def _first(self, name: str, request: Any, context: Any) -> Any:
        try:
            return await getattr(self.workers.nodes[0], name)(request)
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details())

    async def ListMembers(self, request: Any, context: Any) -> Any:
        return await self._first("ListMembers", request, context)

    async def ReplaceMember(self, request: Any, context: Any) -> Any:
        return await self._first("ReplaceMember", request, context)

    async def MarkMemberFaulty(self, request: Any, context: Any) -> Any:
        return await self._first("MarkMemberFaulty", request, context)

    async def TrustMember(self, request: Any, context: Any) -> Any:
        return await self._first("TrustMember", request, context)

    async def SetRebuild(self, request: Any, context: Any) -> Any:
        return await self._first("SetRebuild", request, context)

    async def WatchRebuild(self, request: Any, context: Any) -> AsyncIterator[Any]:
        try:
            async for answer in self.workers.nodes[0].WatchRebuild(request):
                yield answer
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details())


def _state_event(state: int) -> pb.WatchEventsResponse:
    event = pb.Event(kind="state", message=_STATE_NAMES.get(state, "starting"), detail_json="{}")
    event.time.GetCurrentTime()
    return pb.WatchEventsResponse(event=event)


def event_with_state(event: pb.Event, state: int) -> pb.Event:
    out = pb.Event()
    out.CopyFrom(event)
    out.message = _STATE_NAMES.get(state, "starting")
    return out


class FanInHealth(HealthBase):
    """grpc.health.v1 for the node: SERVING while every worker is."""

    def __init__(self, fanin: FanIn, services: list[str]) -> None:
        super().__init__(services, NOT_SERVING)
        self.fanin = fanin

    async def keep(self) -> None:
        while not self.fanin.stopping and not self.closed:
            status = SERVING if await self.fanin.serving() else NOT_SERVING
            await self.set_all(int(status))
            await asyncio.sleep(HEALTH_INTERVAL)
        await self.enter_graceful_shutdown()


async def start_fanin_control(
    fanin: FanIn, addr: str, export_name: str, reflection: bool = True
) -> tuple[grpc.aio.Server, str, FanInHealth]:
    """The node's public control endpoint over its workers; returns the server, the address it
    listens on and its health servicer."""
    health = FanInHealth(fanin, health_services(export_name))
    server, bound = await serve_node_service(addr, FanInServicer(fanin, health), health, reflection)
    log.info("control over %d workers on %s (%s)", len(fanin.workers.nodes), bound,
             event_loop_name())  # fmt: skip
    return server, bound, health


async def serve_fanin(
    worker_paths: list[str],
    *,
    run_as: RunAs | None = None,
    node_pid: int,
    started: float,
    export_name: str,
    node_name: str,
    control: str | None,
    metrics: str | None,
    reflection: bool,
    ready_fd: int,
) -> int:
    """The control process: serve until SIGTERM (sent once the workers are gone)."""
    from ..run import stop_signals

    fanin = FanIn(Workers(worker_paths), node_pid, started)
    server = health = None
    bound: dict[str, str | None] = {"control": None, "metrics": None}
    if control:
        server, bound["control"], health = await start_fanin_control(
            fanin, control, export_name, reflection
        )
        keeper = asyncio.ensure_future(health.keep())
    if metrics:
        from .metrics import start_metrics

        await fanin.refresh_view()
        bound["metrics"] = start_metrics(
            fanin.view, metrics, node_name=node_name, refresh=fanin.refresh_view
        )
    if run_as is not None:  # its addresses bound: it becomes -u/-g's user, as the workers
        owned = [a.removeprefix("unix:") for a in bound.values() if a and a.startswith("unix:")]
        run_as.become(owned)
    os.write(ready_fd, json.dumps(bound).encode())
    os.close(ready_fd)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in stop_signals():  # a hangup reaches the whole process group, this one too
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    fanin.stopping = True
    if health is not None:
        await health.close()
        keeper.cancel()
    if server is not None:
        await server.stop(grace=1.0)
    if metrics:
        from .metrics import stop_metrics

        stop_metrics()
    await fanin.workers.close()
    return 0


def _sum_relayed(up: pb.Upstream, per_worker: list[pb.Upstream]) -> None:
    """Each worker relays its own clients (an `nbd` node's `relayed` detail): the node's figures
    are their sums."""
    got = [json.loads(w.detail_json or "{}").get("relayed") for w in per_worker]
    relayed = [r for r in got if isinstance(r, dict)]
    detail = json.loads(up.detail_json or "{}")
    if not isinstance(detail, dict) or not (relayed or "relayed" in detail):
        return
    if relayed:
        detail["relayed"] = {k: sum(r.get(k, 0) for r in relayed) for k in relayed[0]}
    else:
        detail.pop("relayed", None)
    up.detail_json = json.dumps(detail, sort_keys=True)
