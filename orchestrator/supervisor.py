"""The supervisor: applies topologies to running node processes and keeps them running.

It watches each node over grpc.health.v1 (or, for nodes without `--control`, by probing the
NBD socket), restarts a node that exits or stops serving, per its restart policy and with
back-off, and reports what happens as events (logged, kept, and streamed to subscribers).
Dependents are not restarted with their upstream: they reconnect to the same socket by
themselves. Unless the upstream comes back (restarted by a re-apply, or after a crash) offering
less than when the dependent started (smaller, read-only, a flag gone): a filter does not take
such an upstream back, so it is restarted too (and, if it then offers less in turn, its own
dependents); a fan keeps such a member out, and is left to the operator.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nodes import registry
from nodes.base import Capabilities, Support, shortfalls
from nodes.params import ParamError, live_names, update_params
from nodes.server.addresses import AddressError, open_listener, parse_address

from . import plan
from .argv import param_text
from .backends.process import (
    NodeProcess,
    ProcessBackend,
    RunDir,
    StartError,
    exit_text,
)
from .events import Event
from .topology import HealthTimes, Node, Topology

log = logging.getLogger("nbdfabric.orchestrator")

#: How the supervisor watches a node whose `healthcheck:` says nothing: a check every
#: `interval`, each within `timeout`; `retries` unanswered checks in a row and a live process
#: counts as hung and is restarted; a start may take `start_period` (process ready, then
#: SERVING); a node NOT_SERVING for `grace` while its upstreams are healthy is restarted.
WATCH = HealthTimes(interval=0.5, timeout=2.0, retries=6, start_period=60.0, grace=15.0)
#: Timeout of an RPC asking a node for its info or members.
CHECK_TIMEOUT = 2.0
#: Back-off before the n-th consecutive restart: BACKOFF_FIRST * 2**(n-1), at most BACKOFF_MAX.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 10.0
#: Serving this long resets the consecutive-failure count.
STABLE_AFTER = 10.0
STOP_GRACE = 10.0


class ApplyError(RuntimeError):
    """A node could not be started while applying a topology."""


class PortTaken(StartError):
    """A restart cannot listen on the port its export was first given: it is taken."""


class ConfigureError(ValueError):
    def __init__(self, message: str, precondition: bool = False) -> None:
        super().__init__(message)
        self.precondition = precondition


class UnknownNode(ConfigureError):
    """`set NODE` for a node the fabric does not have (NOT_FOUND, not a bad argument value)."""


async def check_health(channel: grpc.aio.Channel, within: float = CHECK_TIMEOUT) -> str:
    """SERVING | NOT_SERVING | UNKNOWN | UNREACHABLE for the node's overall health."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=within)
    except grpc.aio.AioRpcError:
        return "UNREACHABLE"
    except asyncio.CancelledError:
        if _cancelled():
            raise
        return "UNREACHABLE"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


async def configure_node(control: str, changes: dict[str, str]) -> None:
    """NodeService.Configure on one node (the control plane's generated stubs)."""
    try:
        from nodes.control.rpc.nbdfabric.v1 import node_pb2, node_pb2_grpc
    except ImportError as exc:
        raise ConfigureError(f"nodes have no Configure RPC yet ({exc})", True) from None
    async with grpc.aio.insecure_channel(control) as channel:
        stub = node_pb2_grpc.NodeServiceStub(channel)
        try:
            await stub.Configure(node_pb2.ConfigureRequest(changes=changes), timeout=30)
        except grpc.aio.AioRpcError as exc:
            precondition = exc.code() != grpc.StatusCode.INVALID_ARGUMENT
            raise ConfigureError(exc.details() or str(exc.code()), precondition) from None


async def _ask(channel: grpc.aio.Channel, method: str) -> Any:
    """NodeService.METHOD's reply (an empty request), None when the node does not answer."""
    from nodes.control.rpc.nbdfabric.v1 import node_pb2, node_pb2_grpc

    call = getattr(node_pb2_grpc.NodeServiceStub(channel), method)
    try:
        return await call(getattr(node_pb2, f"{method}Request")(), timeout=CHECK_TIMEOUT)
    except grpc.aio.AioRpcError:
        return None
    except asyncio.CancelledError:
        if _cancelled():
            raise
        return None


async def list_members(channel: grpc.aio.Channel) -> Any | None:
    """A fan's members and rebuild progress (NodeService.ListMembers' reply), None when it
    does not answer."""
    return await _ask(channel, "ListMembers")


async def get_offer(channel: grpc.aio.Channel) -> Capabilities | None:
    """What a node offers its clients (NodeService.GetInfo: size, capabilities, minimum block
    size), None when it does not answer."""
    reply = await _ask(channel, "GetInfo")
    if reply is None:
        return None
    caps = reply.capabilities

    def support(level: int) -> Support:  # SUPPORT_LEVEL_NONE = 1, EMULATE, NATIVE; 0 unset
        return Support(min(max(level - 1, 0), Support.NATIVE))

    return Capabilities(
        size=reply.size,
        writable=caps.writable and not reply.read_only,
        flush=caps.flush,
        fua=support(caps.fua),
        trim=caps.trim,
        zero=support(caps.zero),
        fast_zero=caps.fast_zero,
        cache=support(caps.cache),
        block_min=reply.block_sizes.minimum,
    )


def offers_less(was: Capabilities, now: Capabilities) -> str:
    """What `now` lacks of `was` for a person ("size 16777216 -> 8388608, no flush"), or ""."""
    return ", ".join(
        "read-only" if s.what == "writable"
        else f"no {s.what}" if s.was is None
        else f"{s.what} {s.was} -> {s.now}"
        for s in shortfalls(was, now)
    )  # fmt: skip


def _cancelled() -> bool:
    """Whether a CancelledError from a call on a node's channel is our task being cancelled.
    grpc.aio raises it too when the channel is closed under the call: `Status` asking a fan for
    its members while the fan's runner restarts it (NodeRunner.start closes the old channel).
    That is the node not answering; letting it through killed the Status RPC without a reply
    (the client waited for its deadline)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class NodeRunner:
    """One node: its current process (or container), its health, and the loop that keeps it
    up. For fans it also follows the members' states (events on every change)."""

    def __init__(self, sup: Supervisor, node: Node) -> None:
        self.sup = sup
        self.node = node
        self.process: NodeProcess | Any = None
        self.state = "stopped"
        self.health = "UNKNOWN"
        self.restarts = 0
        self.last_error = ""
        self.healthy_since = 0.0
        self.task: asyncio.Task[None] | None = None
        self.channel: grpc.aio.Channel | None = None
        #: A fan's members as it last reported them (node_pb2.Member messages).
        self.members: list[Any] = []
        self.rebuild: Any = None  #: a fan's rebuild progress, as it last reported it
        #: A running node that holds its requests (ctl pause, a pause filter's `p`): health
        #: checks cannot tell (a paused node is SERVING), so status asks (refresh_state).
        self.paused = False
        #: Its export's TCP addresses that asked for port 0, as (place in `listen`, address
        #: as written) -> the address with the port the first start was given: a restart
        #: listens there again, so clients (and `up`'s URIs) keep working.
        self.pinned: dict[tuple[int, str], str] = {}
        #: What it offered its clients at its last start (None: not known): a restart after a
        #: crash that comes back offering less restarts the filters over it (Supervisor).
        self.offered: Capabilities | None = None
        #: What each of its upstream nodes offered when it started: its upstream connection
        #: holds it to that first offer (nodes/upstream.py), not to whatever came after.
        self.promised: dict[str, Capabilities] = {}

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def watch(self) -> HealthTimes:
        """How it is watched (its `healthcheck:` over the defaults; a re-apply may change it)."""
        return self.node.healthcheck.over(WATCH)

    @property
    def control(self) -> str:
        if not self.sup.control:
            return ""
        return str(self.process.control) if self.process is not None else ""

    @property
    def who(self) -> str:
        """pid N, or container ID."""
        proc = self.process
        if proc is not None and proc.container_id:
            return f"container {proc.container_id}"
        return f"pid {proc.pid if proc else 0}"

    def emit(self, kind: str, message: str = "") -> None:
        self.sup.emit(self.name, kind, message)

    # one start ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start a process and wait until it serves; StartError if it does not."""
        topology = self.sup.topology
        assert topology is not None
        await self._close_channel()
        self.state = "starting"
        self.health = "UNKNOWN"
        self.healthy_since = 0.0
        pinned = self._pinned(topology)
        try:
            self._check_pinned_ports()
        except PortTaken as exc:
            self._failed(exc)
            raise
        proc = self.process = self.sup.backend.new_node(self.node, pinned)
        try:
            self.emit("starting")
            await proc.spawn()
            await proc.wait_ready(self.watch.start_period)
            self.emit("started", self.who)
            self._pin(topology, proc.info.get("uris", []))
            await self._wait_serving(proc)
        except StartError as exc:
            await proc.kill()
            self._failed(exc)
            raise
        except asyncio.CancelledError:  # an apply cut short (Ctrl-C, its client went away)
            await proc.kill()
            self.state = "stopped"
            raise
        self.state = "running"
        self.sup.save_state()
        self.offered = None
        self.promised = {
            up: runner.offered
            for up in self.node.node_upstreams()
            if (runner := self.sup.runners.get(up)) is not None and runner.offered is not None
        }
        if self.sup.topology is not None and self.sup.topology.dependents(self.name):
            self.offered = await self.offer()

    def _failed(self, exc: StartError) -> None:
        self.state = "failed"
        # "exited with status 1", not "node 'x' exited with status 1; /run/x.log:"
        self.last_error = str(exc).split("; ", 1)[0].removeprefix(f"node {self.name!r} ")
        self.emit("start-failed", str(exc))

    def _pinned(self, topology: Topology) -> Topology:
        """`topology` with the node's port-0 addresses at the ports of its first start."""
        export = topology.export_of(self.name)
        written = set(enumerate(export.listen)) if export is not None else set()
        self.pinned = {k: v for k, v in self.pinned.items() if k in written}  # edited away
        if export is None or not self.pinned:
            return topology
        listen = tuple(self.pinned.get((i, a), a) for i, a in enumerate(export.listen))
        exports = {**topology.exports, export.name: dataclasses.replace(export, listen=listen)}
        return dataclasses.replace(topology, exports=exports)

    def _pin(self, topology: Topology, uris: list[str]) -> None:
        """Learn the ports the node was given for port 0 from the URIs it serves: its TCP ones
        come in the order of its TCP addresses (`topology` has them as written)."""
        export = topology.export_of(self.name)
        if export is None:
            return
        tcp = [(i, a) for i, a in enumerate(export.listen) if not a.startswith(("unix:", "fd:"))]
        ports = [urlsplit(u).port for u in uris if urlsplit(u).scheme in ("nbd", "nbds")]
        if len(ports) != len(tcp):
            log.warning("%s: cannot tell which of %s serves which of %s", self.name, uris, tcp)
            return
        for (i, addr), port in zip(tcp, ports, strict=True):
            host, _, asked = addr.rpartition(":")
            if asked == "0" and port and (i, addr) not in self.pinned:
                self.pinned[(i, addr)] = f"{host}:{port}"

    def _check_pinned_ports(self) -> None:
        """PortTaken if a port the node keeps is taken (the node would only say `Address
        already in use`, not why it wants that port)."""
        for (_, asked), addr in self.pinned.items():
            try:
                open_listener(parse_address(addr)).close()
            except AddressError as exc:
                raise PortTaken(
                    f"node {self.name!r} {exc} (its export asked for {asked} and was given "
                    "this port at its first start: restarts keep it for the clients that use "
                    "it); free the port, or `nbdfabric down` and `up` for a new one"
                ) from None

    async def _wait_serving(self, proc: NodeProcess) -> None:
        start_period = self.watch.start_period
        deadline = time.monotonic() + start_period
        while True:
            health = await self.check()
            if health == "SERVING":
                self._set_health(health)
                return
            if not proc.alive():
                raise StartError(proc.failure(exit_text(proc.returncode)))
            if time.monotonic() > deadline:
                raise StartError(proc.failure(f"not SERVING after {start_period:g}s ({health})"))
            await proc.wait_exit(0.05)

    async def check(self) -> str:
        if self.sup.control:
            if self.channel is None:
                self.channel = grpc.aio.insecure_channel(self.control)
            return await check_health(self.channel, self.watch.timeout)
        ok = await asyncio.to_thread(self.sup.backend.probe, self.process)
        return "SERVING" if ok else "UNREACHABLE"

    async def offer(self) -> Capabilities | None:
        """What the running node offers its clients; None if it does not run or answer."""
        if not self.sup.control or self.process is None or not self.process.alive():
            return None
        if self.channel is None:
            self.channel = grpc.aio.insecure_channel(self.control)
        return await get_offer(self.channel)

    async def refresh_members(self) -> None:
        """Ask a fan for its members; an event when their states changed."""
        if self.node.role != "fan" or self.channel is None or not self.process:
            return
        reply = await list_members(self.channel)
        if reply is None:
            return
        members = list(reply.members)
        before = [(m.index, m.state) for m in self.members]
        self.members, self.rebuild = members, reply.rebuild
        after = [(m.index, m.state) for m in members]
        if after != before:
            self.emit("members", " ".join(f"{i}:{state}" for i, state in after))

    async def refresh_state(self) -> None:
        """Whether the node is paused, from its GetInfo: asked when status is, not per check."""
        from nodes.control.rpc.nbdfabric.v1 import node_pb2

        if self.channel is None or not self.process or self.state != "running":
            self.paused = False
            return
        reply = await _ask(self.channel, "GetInfo")
        self.paused = reply is not None and reply.state == node_pb2.NODE_STATE_PAUSED

    def _set_health(self, health: str) -> None:
        before, self.health = self.health, health
        if health == "SERVING" and before != "SERVING":
            self.healthy_since = time.time()
            self.emit("healthy")
        elif health != "SERVING" and before == "SERVING":
            self.healthy_since = 0.0
            self.emit("unhealthy", health)

    # supervision ------------------------------------------------------------------------------

    def supervise(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._supervise(), name=f"supervise {self.name}")
            self.task.add_done_callback(self._supervision_ended)

    def _supervision_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("supervising %s failed: %r", self.name, exc, exc_info=exc)
            self.state, self.last_error = "failed", f"supervisor error: {exc!r}"
            self.emit("gave-up", self.last_error)

    async def _watch(self) -> tuple[str, int | None]:
        """Return (why, exit status) when the process exits or stops serving for too long."""
        proc = self.process
        assert proc is not None
        unreachable = 0
        bad_since = 0.0
        said_why = False
        while True:
            watch = self.watch
            await proc.wait_exit(watch.interval)
            if proc.returncode is not None:
                self.health = "UNKNOWN"
                self.healthy_since = 0.0
                return exit_text(proc.returncode), proc.returncode
            health = await self.check()
            if proc.returncode is not None:
                continue
            self._set_health(health)
            if health == "SERVING":
                unreachable, bad_since, said_why = 0, 0.0, False
                await self.refresh_members()
                continue
            if health == "UNREACHABLE":
                unreachable += 1
                if unreachable >= watch.retries:
                    return "does not answer health checks", None
                continue
            unreachable = 0
            bad_since = bad_since or time.monotonic()
            if time.monotonic() - bad_since < watch.grace or not self.sup.upstreams_ok(self.node):
                continue
            if self.node.role == "fan":
                # A fan that does not serve knows which members it cannot trust; a new process
                # would start with every member in sync and serve whichever it reads (stale
                # data). It waits for its members or for the operator (`ctl trust`) instead.
                if not said_why:
                    said_why = True
                    self.emit("failed", f"{health} for {watch.grace:g}s with healthy "
                              "upstreams: not restarted (see `nbdfabric status`)")  # fmt: skip
                continue
            return f"{health} for {watch.grace:g}s with healthy upstreams", None

    async def _supervise(self) -> None:
        failures = 0
        taken = False  #: the last restart found its port taken: no process ran to watch
        while True:
            if taken:
                why, status = self.last_error, None
            else:
                why, status = await self._watch()
                self.last_error = why
                self.emit("exited" if status is not None else "unhealthy", why)
            proc = self.process
            assert proc is not None
            if self.healthy_since and time.time() - self.healthy_since >= STABLE_AFTER:
                failures = 0
            policy = self.node.restart
            if policy == "never" or (policy == "on-failure" and status == 0):
                await proc.kill()
                self.state = "stopped" if status == 0 else "failed"
                self.sup.save_state()
                return
            if failures >= self.node.max_restarts:
                await proc.kill()
                self.state = "failed"
                self.emit("gave-up", f"{failures} restarts in a row failed; last: {why}")
                self.sup.save_state()
                return
            failures += 1
            delay = min(BACKOFF_FIRST * 2 ** (failures - 1), BACKOFF_MAX)
            self.state = "restarting"
            await asyncio.sleep(delay)
            alive = proc.alive()
            status = await proc.stop(STOP_GRACE)
            if alive and status in (-signal.SIGKILL, 128 + signal.SIGKILL):  # (a container's)
                self.emit("killed", f"did not exit within {STOP_GRACE:g}s of SIGTERM")
            self.restarts += 1
            before = self.offered
            try:
                await self.start()
            except StartError as exc:  # start() said why (start-failed)
                taken = isinstance(exc, PortTaken)
                continue
            taken = False
            self.emit("restarted", f"{self.who} (restart {self.restarts})")
            # (a file that shrank while the node was down, say)
            await self.sup.restart_over(self.name, before, self.offered)

    # stop ---------------------------------------------------------------------------------

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None
        was_running = self.process is not None and self.process.alive()
        if self.process is not None:
            await self.process.stop(STOP_GRACE)
        await self._close_channel()
        self.state, self.health, self.healthy_since = "stopped", "UNKNOWN", 0.0
        if was_running:
            self.emit("stopped")

    async def _close_channel(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None

    @property
    def pid(self) -> int:
        return self.process.pid if self.process and self.process.alive() else 0

    def status(self) -> dict[str, Any]:
        topology = self.sup.topology
        export = topology.export_of(self.name) if topology else None
        proc = self.process
        alive = proc is not None and proc.alive()
        return {
            "name": self.name,
            "kind": self.node.kind,
            "role": self.node.role,
            "state": "paused" if self.paused and self.state == "running" else self.state,
            "health": self.health if alive else "UNKNOWN",
            "pid": self.pid,
            "container_id": proc.container_id if alive and proc else "",
            "restarts": self.restarts,
            "uptime_seconds": round(time.time() - proc.started_at, 3) if alive and proc else 0.0,
            "uri": self.sup.backend.internal_uri(topology, self.name) if topology else "",
            "control": self.control,
            "upstreams": list(self.node.upstreams),
            "export_name": export.name if export else "",
            "log_path": str(self.sup.run.log(self.name)),
            "last_error": self.last_error,
            "export_uris": self.export_uris(),
            "members": list(self.members) if alive else [],
            "rebuild": self.rebuild if alive else None,
            "exports": self.node.multi_export or "",
        }

    def export_uris(self) -> list[str]:
        """The node's URIs other than its internal socket (the real port when 0 was asked)."""
        if not self.process or not self.process.info:
            return []
        internal = str(self.sup.run.sock(self.name))
        return [str(u) for u in self.process.info.get("uris", []) if internal not in u]


class Supervisor:
    """Every node of one fabric; `apply` is serialised, supervision runs per node."""

    def __init__(
        self,
        run: RunDir,
        control: bool | None = None,
        backend: str = "process",
        image: str | None = None,
    ) -> None:
        self.run = run
        self.control = True if control is None else control  # nodes serve gRPC health
        self.backend: Any
        if backend == "docker":
            from .backends.docker import DockerBackend

            self.control = True  # containers are watched through their published control port
            self.backend = DockerBackend(run, image)
        else:
            self.backend = ProcessBackend(run, self.control)
        self.topology: Topology | None = None
        self.runners: dict[str, NodeRunner] = {}
        self.events: collections.deque[Event] = collections.deque(maxlen=1000)
        self.subscribers: list[asyncio.Queue[Event]] = []
        self.lock = asyncio.Lock()
        self.finished = asyncio.Event()
        #: The apply under way, which `down` cancels.
        self.applying: asyncio.Future[list[plan.Action]] | None = None

    # events ---------------------------------------------------------------------------------

    def emit(self, node: str, kind: str, message: str = "") -> None:
        event = Event(time.time(), node, kind, message)
        self.events.append(event)
        log.info("%s", event)
        for queue in list(self.subscribers):
            if queue.qsize() < 10000:
                queue.put_nowait(event)

    async def watch(self, replay: bool = False) -> AsyncIterator[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        if replay:
            for event in self.events:
                queue.put_nowait(event)
        self.subscribers.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self.subscribers.remove(queue)

    # apply ----------------------------------------------------------------------------------

    async def apply(self, topology: Topology, dry_run: bool = False) -> list[plan.Action]:
        """Bring the fabric to `topology`; ApplyError names the nodes that did not start, or
        says that `down` cut the apply short."""
        async with self.lock:
            work = self.applying = asyncio.ensure_future(self._apply(topology, dry_run))
            try:
                return await work
            except asyncio.CancelledError:
                if not work.cancelled() or _cancelled():
                    raise
                raise ApplyError("stopped by `down` before every node had started") from None
            finally:
                self.applying = None

    async def _apply(self, topology: Topology, dry_run: bool) -> list[plan.Action]:
        old = self.topology
        actions = [self._unless_down(a) for a in plan.diff(old, topology)]
        if dry_run:
            return actions
        by_node = {a.node: a for a in actions}
        for a in actions:
            if a.action == plan.REMOVE:
                await self.runners.pop(a.node).stop()
        self.topology = topology
        for a in actions:
            if a.action in (plan.UNCHANGED, plan.CONFIGURE):
                self.runners[a.node].node = topology.nodes[a.node]
        for a in actions:
            if a.action == plan.CONFIGURE and not await self._configure_live(a):
                by_node[a.node] = plan.Action(a.node, plan.RESTART, a.reason + " (restart)")
        self.emit("", "apply", ", ".join(f"{a.node}:{a.action}" for a in by_node.values()))
        try:
            await self.backend.prepare(topology)
        except Exception as exc:  # the engine refused: name it, start nothing
            self.emit("", "apply-failed", f"{self.backend.name} backend")
            raise ApplyError(f"{self.backend.name} backend: {exc}") from exc
        failures: list[str] = []
        for group in plan.levels(topology):
            todo = [n for n in group if by_node[n].action in (plan.ADD, plan.RESTART)]
            # What each offered before (its dependents that started before it was known hold
            # it to that; those that started later, to what it offered then).
            before = {n: r.offered if (r := self.runners.get(n)) else None for n in todo}
            results = await asyncio.gather(
                *(self._start(topology.nodes[n]) for n in todo),
                return_exceptions=True,
            )
            failures += [str(r) for r in results if isinstance(r, BaseException)]
            if failures:
                break
            for name in todo:
                self._restart_dependents(name, before[name], by_node)
        self.save_state()
        # The last event of an apply: `up` prints the ones before it as progress.
        if failures:
            self.emit("", "apply-failed", f"{len(failures)} nodes did not start")
            raise ApplyError("\n".join(failures))
        self.emit("", "applied")
        return list(by_node.values())

    def _unless_down(self, action: plan.Action) -> plan.Action:
        """A node the file leaves as it is but that does not run (an earlier apply failed or
        was interrupted before it, or supervision gave up on it) is started again: `up`
        brings the fabric to what the file says, as docker compose does."""
        if action.action not in (plan.UNCHANGED, plan.CONFIGURE):
            return action
        runner = self.runners.get(action.node)
        if runner is None:
            return plan.Action(action.node, plan.ADD, "not started yet")
        alive = runner.process is not None and runner.process.alive()  # a container has no pid
        if alive or (runner.task is not None and not runner.task.done()):
            return action  # running, or being restarted by its supervision
        return plan.Action(action.node, plan.RESTART, f"not running: {runner.state}")

    def _kept(self, name: str, by_node: dict[str, plan.Action]) -> list[str]:
        """The nodes over `name` that this apply leaves running (their upstream connections
        hold on to what `name` offered them)."""
        assert self.topology is not None
        restarted = (plan.ADD, plan.RESTART)
        return [n for n in self.topology.dependents(name) if by_node[n].action not in restarted]

    def _stranded(
        self, name: str, deps: list[str], before: Capabilities | None, now: Capabilities | None
    ) -> list[tuple[str, str]]:
        """The nodes of `deps` that `name`, now offering `now`, offers less than what it
        offered when they started (`before` where that is not known), with what it lacks; the
        fans among them are told, not returned: a new process would forget its members'
        states. An offer grown and then shrunk back strands nobody."""
        assert self.topology is not None
        if now is None:
            if before is not None and deps:
                log.warning("%s: no offer to compare after its restart; %s left as they are",
                            name, ", ".join(deps))  # fmt: skip
            return []
        stranded = []
        for dep in deps:
            runner = self.runners.get(dep)
            was = runner.promised.get(name, before) if runner is not None else before
            lost = offers_less(was, now) if was is not None else ""
            if not lost:
                continue
            if self.topology.nodes[dep].role == "fan":
                self.emit(dep, "member-offers-less", f"member {name} offers less ({lost}): the "
                          "fan keeps it out; replace the member (`nbdfabric ctl ADDR replace`) "
                          "or restart the fan")  # fmt: skip
                continue
            reason = f"upstream {name} offers less: {lost}"
            self.emit(dep, "restart-needed", reason)
            stranded.append((dep, reason))
        return stranded

    def _restart_dependents(
        self, name: str, before: Capabilities | None, by_node: dict[str, plan.Action]
    ) -> None:
        """`name` was restarted by this apply: the filters over it that it now offers less
        than they started with would not take it back (nodes/upstream.py), so they are
        restarted too, in their level (then holding it to what it offers now)."""
        now = self.runners[name].offered
        for dep, reason in self._stranded(name, self._kept(name, by_node), before, now):
            by_node[dep] = plan.Action(dep, plan.RESTART, reason)

    async def restart_over(
        self, name: str, before: Capabilities | None, now: Capabilities | None
    ) -> None:
        """`name` came back from a crash: the filters over it that it now offers less than
        they started with are restarted (and theirs, if they then offer less in turn), as in
        an apply."""
        assert self.topology is not None
        running = [
            dep
            for dep in self.topology.dependents(name)
            if (r := self.runners.get(dep)) is not None and r.state in ("running", "restarting")
        ]
        for dep, _reason in self._stranded(name, running, before, now):
            with contextlib.suppress(StartError):  # start() said why; its supervision is over
                await self._restart(dep)

    async def _restart(self, name: str) -> None:
        """Stop and start `name`'s process and supervise it again, then restart the filters
        over it that it now offers less (restart_over); StartError if it did not start."""
        runner = self.runners[name]
        before = runner.offered
        await runner.stop()
        await runner.start()
        runner.supervise()
        await self.restart_over(name, before, runner.offered)

    async def _start(self, node: Node) -> None:
        """Start or restart `node`."""
        runner = self.runners.get(node.name)
        old = runner.node if runner is not None else None
        if runner is not None:
            await runner.stop()
            runner.node = node
        else:
            runner = self.runners[node.name] = NodeRunner(self, node)
        if old is None or _state_differs(old, node):
            # Another array (or a new one): what the last one knew of its members is not true
            # of this one. Other restarts (a crash, another read policy) keep it.
            self.backend.forget_state(node.name)
        await runner.start()
        runner.supervise()

    async def _configure_live(self, action: plan.Action) -> bool:
        runner = self.runners[action.node]
        if not runner.control or not runner.pid:
            return False
        changes = {k: param_text(v) for k, v in action.changes.items()}
        try:
            await configure_node(runner.control, changes)
        except ConfigureError as exc:
            self.emit(action.node, "configure-failed", f"{exc}; restarting instead")
            return False
        self.emit(action.node, "configured", ", ".join(f"{k}={v}" for k, v in changes.items()))
        return True

    async def configure(self, name: str, changes: dict[str, str]) -> None:
        """`nbdfabric set NODE K=V`: live params now, and kept for later restarts."""
        async with self.lock:
            runner = self.runners.get(name)
            if runner is None or self.topology is None:
                known = ", ".join(self.runners) or "(none)"
                raise UnknownNode(f"no node named {name!r} (nodes: {known})")
            node = runner.node
            model = type(node.params)
            live = live_names(model)
            fixed = sorted(k for k in changes if k not in live and k in _param_names(model))
            if fixed:
                raise ConfigureError(
                    f"{node.kind}: {', '.join(fixed)} cannot change while the node serves "
                    f"(live params: {', '.join(sorted(live)) or 'none'}); edit the topology "
                    "file and run `nbdfabric up` again",
                    precondition=True,
                )
            try:
                params = update_params(node.kind, node.params, dict(changes))
            except ParamError as exc:
                raise ConfigureError(str(exc)) from None
            if not runner.control:
                raise ConfigureError("nodes run without gRPC control here", precondition=True)
            await configure_node(runner.control, changes)
            new = dataclasses.replace(
                node, params=params, raw_params={**node.raw_params, **changes}
            )
            runner.node = new
            nodes = dict(self.topology.nodes)
            nodes[name] = new
            self.topology = dataclasses.replace(self.topology, nodes=nodes)
            self.emit(name, "configured", ", ".join(f"{k}={v}" for k, v in changes.items()))

    # stop, start, restart -------------------------------------------------------------------

    async def operate(self, action: str, names: list[str]) -> list[str]:
        """`nbdfabric stop|start|restart NODE...`, as docker compose's commands of those names:
        `stop` stops the nodes (dependents first) and they stay stopped, unsupervised, until a
        `start`, a `restart` or an `up` (the filters over them fail requests meanwhile, and a
        fan runs degraded); `start` starts the stopped or failed ones (upstreams first) and
        supervises them again; `restart` does both, as a crash would: a fan keeps its member
        states, and the filters over a node that comes back offering less are restarted too.
        Returns the nodes acted on; UnknownNode, or ApplyError naming those that did not
        start."""
        assert action in ("stop", "start", "restart")
        async with self.lock:
            if not names:
                raise ConfigureError(f"{action}: name the nodes to {action}")
            unknown = [n for n in names if n not in self.runners]
            if unknown or self.topology is None:
                known = ", ".join(self.runners) or "(none)"
                raise UnknownNode(f"no node named {(unknown or names)[0]!r} (nodes: {known})")
            order = [n for group in plan.levels(self.topology) for n in group if n in names]
            acted: list[str] = []
            if action == "stop":
                for name in reversed(order):
                    runner = self.runners[name]
                    if runner.state != "stopped":
                        await runner.stop()
                        acted.append(name)
                self.save_state()
                return acted
            failures = []
            for name in order:
                runner = self.runners[name]
                alive = runner.process is not None and runner.process.alive()
                if action == "start" and alive and runner.state != "stopped":
                    continue  # running (or being restarted by its supervision)
                try:
                    await self._restart(name)
                except StartError as exc:  # start() said why (start-failed)
                    failures.append(str(exc))
                    continue
                acted.append(name)
            self.save_state()
            if failures:
                raise ApplyError("\n".join(failures))
            return acted

    # down -----------------------------------------------------------------------------------

    async def down(self) -> list[str]:
        if self.applying is not None:
            # A start under way (a node waiting for its upstream for --upstream-timeout) ends
            # now rather than holding the lock, and Ctrl-C or `down` with it, until it is over.
            self.applying.cancel()
        async with self.lock:
            stopped: list[str] = []
            if self.topology is not None:
                for group in reversed(plan.levels(self.topology)):
                    names = [n for n in group if n in self.runners]
                    await asyncio.gather(*(self.runners[n].stop() for n in names))
                    stopped += names
            self.runners.clear()
            if self.topology is not None:
                try:
                    await self.backend.teardown(self.topology.name)
                except Exception as exc:
                    log.error("tearing down the %s backend failed: %r", self.backend.name, exc)
            self.topology = None
            with contextlib.suppress(FileNotFoundError):
                self.run.state.unlink()
            self.emit("", "down", f"stopped {len(stopped)} nodes")
            self.finished.set()
            return stopped

    # queries --------------------------------------------------------------------------------

    def upstreams_ok(self, node: Node) -> bool:
        return all(
            (r := self.runners.get(u)) is not None and r.health == "SERVING"
            for u in node.node_upstreams()
        )

    async def refresh_members(self) -> None:
        await asyncio.gather(*(r.refresh_members() for r in list(self.runners.values())))

    async def refresh_states(self) -> None:
        await asyncio.gather(*(r.refresh_state() for r in list(self.runners.values())))

    def status(self) -> list[dict[str, Any]]:
        if self.topology is None:
            return []
        return [self.runners[n].status() for n in self.topology.nodes if n in self.runners]

    def exports(self) -> list[dict[str, Any]]:
        """Each export with the URIs its node reported (the real port when 0 was asked)."""
        if self.topology is None:
            return []
        out = []
        for export in self.topology.exports.values():
            runner = self.runners.get(export.node)
            uris = runner.export_uris() if runner else []
            out.append(
                {
                    "name": export.name,
                    "node": export.node,
                    "uris": uris,
                    "exports": export.multi_export or "",
                }
            )
        return out

    def save_state(self) -> None:
        """What `down` needs if this supervisor dies: the pids of the nodes."""
        if self.topology is None:
            return
        state = {
            "fabric": self.topology.name,
            "source": self.topology.source,
            "supervisor_pid": os.getpid(),
            "backend": self.backend.name,
            "nodes": {
                n: {
                    "pid": r.pid,
                    "kind": r.node.kind,
                    "container_id": r.process.container_id if r.process else "",
                }
                for n, r in self.runners.items()
            },
        }
        tmp = self.run.state.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.run.state)


def _param_names(model: Any) -> set[str]:
    return {f.alias or n for n, f in model.model_fields.items()}


def _state_differs(old: Node, new: Node) -> bool:
    """Whether a node's state file (Backend.state_param) no longer describes the new node."""
    keys = registry.get(new.kind).state_keys
    before, after = old.normalized_params(), new.normalized_params()
    return (
        old.kind != new.kind
        or old.upstreams != new.upstreams
        or any(before.get(k) != after.get(k) for k in keys)
    )
