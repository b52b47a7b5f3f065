"""The supervisor's gRPC endpoint (OrchestratorService + grpc.health.v1 + reflection) on
RUN/orchestrator.sock, and `hosted()`: a supervisor that owns its run dir while it lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from nodes.control.rpc.nbdfabric.v1 import orchestrator_pb2 as pb
from nodes.control.rpc.nbdfabric.v1 import orchestrator_pb2_grpc as pb_grpc

from .backends.process import RunDir
from .supervisor import ApplyError, ConfigureError, Supervisor, UnknownNode
from .topology import TopologyError, load_text

SERVICE = pb.DESCRIPTOR.services_by_name["OrchestratorService"].full_name


class AlreadyRunning(RuntimeError):
    pass


def status_message(sup: Supervisor, node: dict[str, Any]) -> pb.NodeStatus:
    return pb.NodeStatus(**node)


def export_messages(sup: Supervisor) -> list[pb.FabricExport]:
    return [pb.FabricExport(**e) for e in sup.exports()]


class OrchestratorServicer(pb_grpc.OrchestratorServiceServicer):
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    async def Apply(self, request: pb.ApplyRequest, context: Any) -> pb.ApplyResponse:
        try:
            topology = load_text(
                request.topology_yaml,
                request.source or "<topology>",
                base_dir=request.base_dir or None,
                env={},  # the CLI expanded variables with the user's environment
            )
        except TopologyError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if self.sup.finished.is_set():
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the fabric is going down")
        try:
            actions = await self.sup.apply(topology, dry_run=request.dry_run)
        except ApplyError as exc:
            await context.abort(grpc.StatusCode.ABORTED, str(exc))
        return pb.ApplyResponse(
            actions=[
                pb.PlannedAction(node=a.node, action=a.action, reason=a.reason) for a in actions
            ],
            exports=export_messages(self.sup),
        )

    async def Status(self, request: pb.StatusRequest, context: Any) -> pb.StatusResponse:
        await asyncio.gather(self.sup.refresh_members(), self.sup.refresh_states())
        top = self.sup.topology
        return pb.StatusResponse(
            fabric=top.name if top else "",
            nodes=[pb.NodeStatus(**n) for n in self.sup.status()],
            exports=export_messages(self.sup),
            supervisor_pid=os.getpid(),
            run_dir=str(self.sup.run.path),
            source=top.source if top else "",
            backend=self.sup.backend.name,
        )

    async def WatchFabricEvents(
        self, request: pb.WatchFabricEventsRequest, context: Any
    ) -> AsyncIterator[pb.WatchFabricEventsResponse]:
        if not request.follow:
            for event in list(self.sup.events) if request.replay else []:
                yield pb.WatchFabricEventsResponse(
                    time=event.time, node=event.node, kind=event.kind, message=event.message
                )
            return
        async for event in self.sup.watch(replay=request.replay):
            yield pb.WatchFabricEventsResponse(
                time=event.time, node=event.node, kind=event.kind, message=event.message
            )

    async def ConfigureNode(
        self, request: pb.ConfigureNodeRequest, context: Any
    ) -> pb.ConfigureNodeResponse:
        try:
            await self.sup.configure(request.node, dict(request.changes))
        except ConfigureError as exc:
            code = (
                grpc.StatusCode.NOT_FOUND
                if isinstance(exc, UnknownNode)
                else grpc.StatusCode.FAILED_PRECONDITION
                if exc.precondition
                else grpc.StatusCode.INVALID_ARGUMENT
            )
            await context.abort(code, str(exc))
        return pb.ConfigureNodeResponse()

    async def StopNodes(self, request: pb.StopNodesRequest, context: Any) -> pb.StopNodesResponse:
        return pb.StopNodesResponse(stopped=await self._operate("stop", request, context))

    async def StartNodes(
        self, request: pb.StartNodesRequest, context: Any
    ) -> pb.StartNodesResponse:
        started = await self._operate("start", request, context)
        return pb.StartNodesResponse(started=self._statuses(started))

    async def RestartNodes(
        self, request: pb.RestartNodesRequest, context: Any
    ) -> pb.RestartNodesResponse:
        restarted = await self._operate("restart", request, context)
        return pb.RestartNodesResponse(restarted=self._statuses(restarted))

    async def _operate(self, action: str, request: Any, context: Any) -> list[str]:
        if self.sup.finished.is_set():
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the fabric is going down")
        try:
            return await self.sup.operate(action, list(request.nodes))
        except UnknownNode as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except ConfigureError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ApplyError as exc:
            await context.abort(grpc.StatusCode.ABORTED, str(exc))
        raise AssertionError("unreachable")  # abort() raises

    def _statuses(self, names: list[str]) -> list[pb.NodeStatus]:
        by_name = {n["name"]: n for n in self.sup.status()}
        return [pb.NodeStatus(**by_name[n]) for n in names if n in by_name]

    async def Down(self, request: pb.DownRequest, context: Any) -> pb.DownResponse:
        return pb.DownResponse(stopped=await self.sup.down())


def _lock(run: RunDir) -> int:
    fd = os.open(run.lockfile, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning(f"a supervisor already runs this fabric ({run.path})") from None
    return fd


@contextlib.asynccontextmanager
async def hosted(
    run: RunDir, backend: str = "process", image: str | None = None
) -> AsyncIterator[Supervisor]:
    """A supervisor serving gRPC on RUN/orchestrator.sock; on exit every node is stopped and
    the run dir holds nothing but logs. `backend`: process (default) or docker."""
    run.path.mkdir(parents=True, exist_ok=True)
    lock = _lock(run)
    try:
        sup = Supervisor(run, backend=backend, image=image)
    except Exception:
        os.close(lock)
        with contextlib.suppress(FileNotFoundError):
            run.lockfile.unlink()
        raise
    server = grpc.aio.server()
    pb_grpc.add_OrchestratorServiceServicer_to_server(OrchestratorServicer(sup), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    with contextlib.suppress(FileNotFoundError):
        run.api.unlink()
    server.add_insecure_port(f"unix:{run.api}")
    await server.start()
    for name in ("", SERVICE):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    run.pidfile.write_text(f"{os.getpid()}\n")
    try:
        yield sup
    finally:
        if not sup.finished.is_set():
            await asyncio.shield(sup.down())
        await health.enter_graceful_shutdown()
        await server.stop(grace=1.0)
        for p in (run.api, run.pidfile, run.state, run.lockfile):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        os.close(lock)
