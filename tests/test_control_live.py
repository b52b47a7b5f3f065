"""Live configure seen in the data path: a real gRPC client changes the `error` and `delay`
filters' params on a node served in-process (on uvloop, in a thread) over a memory plugin, and a
real NBD client (libnbd) observes the effect on its next request.
"""

from __future__ import annotations

import asyncio
import errno
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import nbd
import pytest
import uvloop
from conftest import nbd_connect

from nodes.base import Backend
from nodes.control.rpc.nbdfabric.v1 import node_pb2 as pb
from nodes.control.rpc.nbdfabric.v1 import node_pb2_grpc as pb_grpc
from nodes.control.server import start_control
from nodes.plugins.memory import Memory, MemoryParams
from nodes.server.addresses import parse_address
from nodes.server.node import NodeOptions, NodeRuntime

error_filter = pytest.importorskip("nodes.filters.error", reason="the error filter is not there")
delay_filter = pytest.importorskip("nodes.filters.delay", reason="the delay filter is not there")


@contextmanager
def serve(backend: Backend, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Serve `backend` with gRPC control on a uvloop thread; yields (NBD URI, control addr)."""
    box: dict[str, Any] = {}
    ready = threading.Event()

    async def main() -> None:
        rt = NodeRuntime(backend, NodeOptions())
        await rt.start(listen=[parse_address(f"unix:{tmp_path}/nbd.sock")])
        server, addr = await start_control(rt, f"unix:{tmp_path}/ctl.sock")
        box.update(rt=rt, addr=addr, loop=asyncio.get_running_loop())
        ready.set()
        await rt.stopped.wait()
        await server.stop(grace=1)

    def run() -> None:
        try:
            uvloop.run(main())
        except BaseException as exc:
            box["error"] = exc
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(20), "in-process node did not start"
    if "error" in box:
        raise box["error"]
    try:
        yield box["rt"].uris()[0], box["addr"]
    finally:
        asyncio.run_coroutine_threadsafe(box["rt"].shutdown(), box["loop"]).result(20)
        thread.join(20)


def memory() -> Memory:
    return Memory(MemoryParams(size=1 << 20))


@pytest.fixture
def node_with(tmp_path) -> Iterator[Callable[[Backend], tuple[Any, Any, grpc.Channel]]]:
    """Start a node for a backend; returns (libnbd handle, NodeService stub, channel)."""
    stack: list[Any] = []

    def start(backend: Backend) -> tuple[Any, Any, grpc.Channel]:
        cm = serve(backend, tmp_path)
        uri, addr = cm.__enter__()
        stack.append(cm)
        ch = grpc.insecure_channel(addr)
        stack.append(ch)
        return nbd_connect(uri), pb_grpc.NodeServiceStub(ch), ch

    yield start
    for item in reversed(stack):
        if isinstance(item, grpc.Channel):
            item.close()
        else:
            item.__exit__(None, None, None)


def test_control_live_error_rate_fails_the_next_read(node_with):
    params = error_filter.ErrorParams()
    h, stub, _ch = node_with(error_filter.Error(params, memory()))
    h.pwrite(b"a" * 512, 0)
    assert h.pread(512, 0) == b"a" * 512

    reply = stub.Configure(
        pb.ConfigureRequest(changes={"error-pread-rate": "100%", "error": "ENOSPC"}), timeout=5
    )
    values = {p.name: p.value for p in reply.params}
    assert values["error"] == "ENOSPC" and values["error-pread-rate"] == "1"
    with pytest.raises(nbd.Error) as exc:
        h.pread(512, 0)
    assert exc.value.args[1] == errno.ENOSPC  # libnbd: (message, errnum)
    h.pwrite(b"b" * 512, 0)  # only reads fail

    stub.Configure(pb.ConfigureRequest(changes={"error-pread-rate": "0"}), timeout=5)
    assert h.pread(512, 0) == b"b" * 512
    h.shutdown()


def test_control_live_bad_value_is_invalid_argument_naming_the_param(node_with):
    h, stub, _ch = node_with(error_filter.Error(error_filter.ErrorParams(), memory()))
    with pytest.raises(grpc.RpcError) as exc:
        stub.Configure(pb.ConfigureRequest(changes={"error-rate": "150%"}), timeout=5)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "error-rate" in exc.value.details()
    # Atomic: a good change beside a bad one is not applied either.
    with pytest.raises(grpc.RpcError):
        stub.Configure(
            pb.ConfigureRequest(changes={"error-pread-rate": "100%", "error": "EBOGUS"}),
            timeout=5,
        )
    assert h.pread(512, 0) == bytes(512)
    h.shutdown()


def test_control_live_delay_slows_the_next_read(node_with):
    h, stub, _ch = node_with(delay_filter.Delay(delay_filter.DelayParams(), memory()))
    stub.Configure(pb.ConfigureRequest(changes={"delay-read": "300ms"}), timeout=5)
    started = time.monotonic()
    h.pread(4096, 0)
    # The loop's timers have millisecond resolution and may fire up to ~1 ms early.
    assert time.monotonic() - started >= 0.295
    stats = stub.GetStats(pb.GetStatsRequest(), timeout=5)
    read = next(o for o in stats.ops if o.op == "read")
    assert read.latency_sum_seconds >= 0.295
    h.shutdown()


class Flaky(Memory):
    """A memory plugin whose health and upstream report the test sets."""

    ok = True

    def healthy(self) -> bool:
        return self.ok

    def status(self) -> dict[str, Any]:
        state = "connected" if self.ok else "down"
        return {"upstreams": [{"uri": "nbd://up:10809", "state": state, "retries": 3}]}


def test_control_health_follows_the_backend(node_with):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    backend = Flaky(MemoryParams(size=1 << 20))
    h, stub, ch = node_with(backend)
    health = health_pb2_grpc.HealthStub(ch)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=20)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    info = stub.GetInfo(pb.GetInfoRequest(), timeout=5)
    assert [(u.uri, u.state, u.healthy) for u in info.upstreams] == [
        ("nbd://up:10809", "connected", True)
    ]

    backend.ok = False  # no event: the periodic check has to notice
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    info = stub.GetInfo(pb.GetInfoRequest(), timeout=5)
    assert not info.healthy and info.upstreams[0].state == "down"
    assert not info.upstreams[0].healthy
    assert '"retries": 3' in info.upstreams[0].detail_json

    backend.ok = True
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    h.shutdown()


class FakeFan(Memory):
    """The fan hooks the control plane calls (the real fans implement the same names)."""

    role = "fan"

    def __init__(self, params: MemoryParams) -> None:
        super().__init__(params)
        self.members = [{"uri": f"nbd://m{i}", "state": "ok"} for i in range(2)]
        self.rebuild: dict[str, Any] = {"running": False, "throttle": 0, "done_bytes": 0}

    def members_info(self) -> list[dict[str, Any]]:
        return [{"index": i, **m} for i, m in enumerate(self.members)]

    async def replace_member(self, index: int, uri: str) -> None:
        self.members[index] = {"uri": uri, "state": "rebuilding"}
        self.rebuild.update(running=True, member=index, total_bytes=1 << 20)

    async def mark_faulty(self, index: int) -> None:
        self.members[index]["state"] = "faulty"

    def set_rebuild(self, running: bool | None, throttle: int | None) -> None:
        if running is not None:
            self.rebuild["running"] = running
        if throttle is not None:
            self.rebuild["throttle"] = throttle

    def rebuild_progress(self) -> dict[str, Any]:
        return dict(self.rebuild, phase="copy")


def test_control_fan_rpcs_call_the_backend(node_with):
    fan = FakeFan(MemoryParams(size=1 << 20))
    h, stub, _ch = node_with(fan)
    listed = stub.ListMembers(pb.ListMembersRequest(), timeout=5)
    assert [(m.index, m.uri, m.state, m.healthy) for m in listed.members] == [
        (0, "nbd://m0", "ok", True),
        (1, "nbd://m1", "ok", True),
    ]
    assert not listed.rebuild.running and not listed.rebuild.HasField("member_index")

    watch = stub.WatchRebuild(pb.WatchRebuildRequest(interval_seconds=0.05), timeout=20)
    assert not next(watch).progress.running

    replaced = stub.ReplaceMember(pb.ReplaceMemberRequest(index=1, uri="nbd://new"), timeout=5)
    assert (replaced.members[1].uri, replaced.members[1].state) == ("nbd://new", "rebuilding")
    progress = next(watch).progress
    assert progress.running and progress.member_index == 1
    assert progress.total_bytes == 1 << 20 and '"phase": "copy"' in progress.detail_json
    watch.cancel()

    faulty = stub.MarkMemberFaulty(pb.MarkMemberFaultyRequest(index=0), timeout=5)
    assert faulty.members[0].state == "faulty" and not faulty.members[0].healthy
    reply = stub.SetRebuild(
        pb.SetRebuildRequest(action=pb.REBUILD_ACTION_STOP, throttle_bytes_per_second=50 << 20),
        timeout=5,
    )
    assert not reply.progress.running
    assert reply.progress.throttle_bytes_per_second == 50 << 20
    reply = stub.SetRebuild(pb.SetRebuildRequest(), timeout=5)  # throttle unset: unchanged
    assert reply.progress.throttle_bytes_per_second == 50 << 20

    with pytest.raises(grpc.RpcError) as exc:
        stub.ReplaceMember(pb.ReplaceMemberRequest(index=2, uri="nbd://x"), timeout=5)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "out of range" in exc.value.details()
    h.shutdown()
