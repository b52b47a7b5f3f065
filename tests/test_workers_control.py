"""gRPC control, health and metrics of a node with `--workers N`: one endpoint answers for
every worker (nodes/control/fanin.py).

As in test_workers.py, SIGSTOP on one worker makes the kernel give the next connection to the
other, so each test knows which worker served what and can tell a sum from one worker's answer.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import nbd
import pytest
from conftest import NBDFABRIC, ROOT, Proc, alive, nbd_connect, wait_for
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from test_control import op

from bench.__main__ import children_of
from nodes.control.rpc.nbdfabric.v1 import node_pb2 as pb
from nodes.control.rpc.nbdfabric.v1 import node_pb2_grpc as pb_grpc


@pytest.fixture
def node(start_node) -> Iterator[tuple[Proc, pb_grpc.NodeServiceStub, grpc.Channel]]:
    p = start_node(
        "memory", "8M", control=True, extra=("--workers", "2", "--metrics", "127.0.0.1:0")
    )
    channel = grpc.insecure_channel(p.control)
    yield p, pb_grpc.NodeServiceStub(channel), channel
    channel.close()


@contextmanager
def only(pid: int, workers: list[int]) -> Iterator[None]:
    """While inside, new connections can only go to worker `pid` (the others are stopped)."""
    others = [w for w in workers if w != pid]
    for w in others:
        os.kill(w, signal.SIGSTOP)
    try:
        yield
    finally:
        for w in others:
            os.kill(w, signal.SIGCONT)


def connect_to(p: Proc, pid: int, workers: list[int]) -> nbd.NBD:
    with only(pid, workers):
        return nbd_connect(p.uri)


def metric(p: Proc, name: str, op_name: str) -> float:
    assert p.metrics
    with urllib.request.urlopen(f"http://{p.metrics}/metrics", timeout=10) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("op") == op_name:
                return float(sample.value)
    raise AssertionError(f"{name}{{op={op_name}}} not in the metrics")


def test_one_endpoint_counts_every_worker(node) -> None:
    p, stub, channel = node
    workers = sorted(p.info["workers"])
    assert len(workers) == 2
    control = set(children_of(p.pid)) - set(workers)
    assert len(control) == 1, "one control process beside the two workers"
    a = connect_to(p, workers[0], workers)
    b = connect_to(p, workers[1], workers)
    for i in range(3):
        a.pwrite(bytes([i + 1]) * 4096, i * 4096)
    for _ in range(5):
        assert b.pread(4096, 4096) == b"\2" * 4096  # written through the other worker
    stats = stub.GetStats(pb.GetStatsRequest(), timeout=10)
    # Each worker served one kind of request: only a sum has both.
    assert (op(stats, "write").count, op(stats, "read").count) == (3, 5)
    assert (op(stats, "write").bytes, op(stats, "read").bytes) == (3 * 4096, 5 * 4096)
    assert (stats.connections_total, stats.connections_open) == (2, 2)
    assert sum(op(stats, "read").latency_buckets) == 5
    assert metric(p, "nbdfabric_requests_total", "write") == 3
    assert metric(p, "nbdfabric_requests_total", "read") == 5

    info = stub.GetInfo(pb.GetInfoRequest(), timeout=10)
    assert info.pid == p.pid and info.kind == "memory" and info.healthy
    assert info.state == pb.NODE_STATE_SERVING and info.size == 8 << 20
    status = json.loads(info.status_json)
    assert sorted(w["pid"] for w in status["workers"]) == workers
    assert all(w["state"] == "serving" and w["healthy"] for w in status["workers"])
    text = subprocess.run(
        [*NBDFABRIC, "ctl", p.control, "info"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "workers" in text and all(str(pid) in text for pid in workers)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "nbdfabric.v1.NodeService"):
        check = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
    a.shutdown()
    b.shutdown()


def test_pause_holds_requests_on_every_worker(node) -> None:
    p, stub, _ = node
    workers = sorted(p.info["workers"])
    conns = [connect_to(p, pid, workers) for pid in workers]
    stub.Pause(pb.PauseRequest(), timeout=10)
    info = stub.GetInfo(pb.GetInfoRequest(), timeout=10)
    assert info.state == pb.NODE_STATE_PAUSED
    assert {w["state"] for w in json.loads(info.status_json)["workers"]} == {"paused"}
    cookies = [(h, h.aio_pread(nbd.Buffer(4096), 0)) for h in conns]
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        for h, _cookie in cookies:
            h.poll(0)
        time.sleep(0.02)
    assert not any(h.aio_command_completed(c) for h, c in cookies), "a worker did not hold"
    stub.Resume(pb.ResumeRequest(), timeout=10)
    for h, cookie in cookies:
        while not h.aio_command_completed(cookie):
            h.poll(1)
        h.shutdown()
    assert stub.GetInfo(pb.GetInfoRequest(), timeout=10).state == pb.NODE_STATE_SERVING


def test_a_worker_refusal_reaches_the_client(node) -> None:
    _, stub, _ = node
    with pytest.raises(grpc.RpcError) as err:
        stub.Configure(pb.ConfigureRequest(changes={"no-such-param": "1"}), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no-such-param" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.ListMembers(pb.ListMembersRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_shutdown_through_control_stops_every_process(node) -> None:
    p, stub, _ = node
    children = children_of(p.pid)
    assert len(children) == 3
    events: list[tuple[str, str]] = []
    watch = stub.WatchEvents(pb.WatchEventsRequest(send_current_state=True), timeout=30)

    def follow() -> None:
        events.extend((r.event.kind, r.event.message) for r in watch)

    follower = threading.Thread(target=follow)
    follower.start()
    wait_for(lambda: events, 10, "the current state")
    stub.Shutdown(pb.ShutdownRequest(), timeout=10)
    assert p.proc.wait(timeout=30) == 0
    follower.join(timeout=10)
    assert not follower.is_alive(), "the event stream did not end with the node"
    assert events[0] == ("state", "serving")
    assert ("state", "draining") in events and events[-1] == ("state", "stopped")
    assert [e for e in events if e == ("state", "draining")] == [("state", "draining")]
    assert not any(alive(pid) for pid in children)
    assert not os.path.exists(p.socket)
    assert not os.path.exists(p.control.removeprefix("unix:"))


def test_killed_worker_and_control_process_are_replaced(node) -> None:
    p, stub, _ = node
    workers = sorted(p.info["workers"])
    h = connect_to(p, workers[0], workers)  # the worker about to be killed counts this write
    h.pwrite(b"k" * 65536, 0)
    h.shutdown()
    written = op(stub.GetStats(pb.GetStatsRequest(), timeout=5), "write").bytes
    assert written == 65536
    os.kill(workers[0], signal.SIGKILL)

    def whole_again() -> bool:
        try:
            info = stub.GetInfo(pb.GetInfoRequest(), timeout=5)
        except grpc.RpcError:
            return False
        pids = {w.get("pid") for w in json.loads(info.status_json)["workers"]}
        return info.healthy and workers[0] not in pids and len(pids) == 2

    wait_for(whole_again, 30, "the worker to be replaced")
    # The node's counters do not go back with the worker that counted them.
    assert op(stub.GetStats(pb.GetStatsRequest(), timeout=5), "write").bytes == written
    (control,) = set(children_of(p.pid)) - {
        w["pid"] for w in json.loads(stub.GetInfo(pb.GetInfoRequest()).status_json)["workers"]
    }
    os.kill(control, signal.SIGKILL)
    wait_for(lambda: any(c != control for c in children_of(p.pid) if c not in workers), 30,
             "another control process")  # fmt: skip
    wait_for(whole_again, 30, "the control endpoint to answer again, at the same address")
    out = subprocess.run(
        ["nbdcopy", p.uri, "-"], capture_output=True, timeout=60, check=True
    ).stdout
    assert out[:65536] == b"k" * 65536 and out[65536:] == bytes(len(out) - 65536)


@pytest.mark.parametrize("tmpdir", ["short", "too-deep"])
def test_unix_control_and_metrics_sockets_go_with_the_node(start_node, tmp_path, tmpdir) -> None:
    """The workers' private control sockets go in $TMPDIR, or in /tmp when a socket path in
    $TMPDIR would not fit in a sockaddr_un (107 bytes); either way they go with the node."""
    metrics = tmp_path / "metrics.sock"
    if tmpdir == "short":
        scratch = Path(tempfile.mkdtemp(prefix="nf-", dir="/tmp"))
    else:
        scratch = tmp_path / ("d" * (100 - len(str(tmp_path))))
        scratch.mkdir()
    try:
        p = start_node("null", "1M", control=True, env={"TMPDIR": str(scratch)},
                       extra=("--workers", "2", "--metrics", f"unix:{metrics}"))  # fmt: skip
        control = p.control.removeprefix("unix:")
        assert metrics.is_socket() and os.path.exists(control)
        if tmpdir == "short":
            (private,) = scratch.iterdir()
            assert sorted(f.name for f in private.iterdir()) == ["worker0.sock", "worker1.sock"]
        else:
            assert list(scratch.iterdir()) == []
        # The control process answers for both workers: it reached their private sockets.
        health = subprocess.run([*NBDFABRIC, "health", p.control], cwd=ROOT,
                                capture_output=True, text=True, timeout=30)  # fmt: skip
        assert health.stdout.split() == ["SERVING"], health.stderr
        children = children_of(p.pid)
        assert p.stop() == 0
        assert not any(alive(pid) for pid in children)
        assert not metrics.exists() and not os.path.exists(control)
        assert not os.path.exists(p.socket) and list(scratch.iterdir()) == []
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_run_captive_mode_gets_the_control_address(tmp_path) -> None:
    run = shlex.join([*NBDFABRIC, "health"]) + ' "$control" && nbdinfo --size "$uri"'
    out = subprocess.run(
        [*NBDFABRIC, "node", "memory", "4M", "--workers", "2", "--listen", f"unix:{tmp_path}/s",
         "--control", f"unix:{tmp_path}/c", "--run", run],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["SERVING", str(4 << 20)]
    assert not (tmp_path / "s").exists() and not (tmp_path / "c").exists()


def test_a_worker_replaced_slowly_keeps_what_the_old_one_counted() -> None:
    """A replacement that took longer than the old worker had lived answers with a larger
    uptime than the old one's last answer: it is another process all the same (its pid), and
    the node's counters must not go back."""
    from nodes.control.fanin import FanIn, Workers

    def answer(pid: int, uptime: float, written: int) -> pb.GetStatsResponse:
        ops = [pb.OpStats(op="write", count=1, bytes=written)]
        return pb.GetStatsResponse(pid=pid, uptime_seconds=uptime, ops=ops)

    fanin = FanIn(Workers([]), node_pid=1, started=0.0)
    assert op(fanin._count([answer(100, 0.5, 65536)]), "write").bytes == 65536
    after = fanin._count([answer(101, 3.0, 4096)])
    assert op(after, "write").bytes == 65536 + 4096
    assert after.pid == 1


def test_relayed_clients_of_every_worker_are_counted(start_node) -> None:
    """An `nbd` node with two workers, a client relayed by each: its upstream's `relayed`
    detail counts both (each worker has its own relays; one worker's answer says 1)."""
    up = start_node("memory", "8M")
    p = start_node("nbd", control=True, upstreams=[up.uri], extra=("--workers", "2"))
    workers = sorted(p.info["workers"])
    conns = [connect_to(p, pid, workers) for pid in workers]
    for h in conns:
        h.pwrite(b"r" * 4096, 0)
    with grpc.insecure_channel(p.control) as channel:
        stub = pb_grpc.NodeServiceStub(channel)
        (upstream,) = stub.GetInfo(pb.GetInfoRequest(), timeout=10).upstreams
        assert json.loads(upstream.detail_json)["relayed"] == {
            "clients": 2, "down": 0, "in_flight": 0,
        }  # fmt: skip
        for h in conns:
            h.shutdown()
        wait_for(
            lambda: (
                "relayed"
                not in stub.GetInfo(pb.GetInfoRequest(), timeout=10).upstreams[0].detail_json
            ),
            10,
            "the relayed clients to be gone",
        )
