"""The control plane against real node processes: gRPC NodeService, grpc.health.v1, reflection,
Prometheus metrics, and the `nbdfabric ctl` / `nbdfabric health` commands.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import nbd
import pytest
from conftest import NBDFABRIC, ROOT, Proc, nbd_connect, wait_for
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from nodes.control.rpc.nbdfabric.v1 import node_pb2 as pb
from nodes.control.rpc.nbdfabric.v1 import node_pb2_grpc as pb_grpc

SIZE = 16 << 20
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def channels() -> Iterator[list[grpc.Channel]]:
    opened: list[grpc.Channel] = []
    yield opened
    for ch in opened:
        ch.close()


@pytest.fixture
def node(start_node, channels):
    """A memory node with gRPC control; returns (proc, NodeService stub, channel)."""

    def start(*extra: str) -> tuple[Proc, pb_grpc.NodeServiceStub, grpc.Channel]:
        p = start_node("memory", "16M", control=True, extra=extra)
        assert p.control
        ch = grpc.insecure_channel(p.control)
        channels.append(ch)
        return p, pb_grpc.NodeServiceStub(ch), ch

    return start


def ctl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*NBDFABRIC, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def op(stats: pb.GetStatsResponse, name: str) -> pb.OpStats:
    return next(o for o in stats.ops if o.op == name)


def test_control_info_reports_the_node(node):
    p, stub, _ = node("--export-name", "vm1")
    info = stub.GetInfo(pb.GetInfoRequest(), timeout=10)
    assert info.kind == "memory"
    assert info.role == pb.NODE_ROLE_PLUGIN
    assert info.state == pb.NODE_STATE_SERVING
    assert info.healthy
    assert info.size == SIZE
    assert info.export_name == "vm1"
    assert p.uri in info.uris
    assert info.capabilities.writable and info.capabilities.flush and info.capabilities.trim
    assert info.capabilities.zero == pb.SUPPORT_LEVEL_NATIVE
    assert not info.read_only
    assert info.block_sizes.minimum >= 1 and info.block_sizes.maximum >= 4096
    size = next(prm for prm in info.params if prm.name == "size")
    assert (size.value, size.type, size.live, size.required) == ("16777216", "size", False, True)
    assert json.loads(info.status_json) == {"allocated_bytes": 0}
    assert info.pid == p.pid
    assert info.version


def test_control_grpc_aio_runs_on_the_node_uvloop(node):
    _, stub, _ = node()
    info = stub.GetInfo(pb.GetInfoRequest(), timeout=10)
    assert info.event_loop == "uvloop"
    # A server stream and unary calls interleaved on the same loop.
    events = stub.WatchEvents(pb.WatchEventsRequest(send_current_state=True), timeout=10)
    assert next(events).event.message == "serving"
    for _ in range(20):
        stub.GetStats(pb.GetStatsRequest(), timeout=5)
    events.cancel()


def test_control_health_serving_then_not_serving_on_shutdown(node):
    p, stub, ch = node("--export-name", "vm1")
    health = health_pb2_grpc.HealthStub(ch)
    for service in ("", "vm1", "nbdfabric.v1.NodeService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == SERVING, service
    with pytest.raises(grpc.RpcError) as exc:
        health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND

    watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=20)
    assert next(watch).status == SERVING
    stub.Shutdown(pb.ShutdownRequest(), timeout=5)
    assert next(watch).status == NOT_SERVING
    assert p.proc.wait(15) == 0


def test_control_reflection_lists_the_services(node):
    _, _, ch = node()
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    req = reflection_pb2.ServerReflectionRequest(list_services="")
    reply = next(iter(stub.ServerReflectionInfo(iter([req]), timeout=10)))
    names = {s.name for s in reply.list_services_response.service}
    assert {"nbdfabric.v1.NodeService", "grpc.health.v1.Health"} <= names
    assert "grpc.reflection.v1alpha.ServerReflection" in names


def test_control_reflection_can_be_turned_off(node):
    _, stub, ch = node("--no-reflection")
    stub.GetInfo(pb.GetInfoRequest(), timeout=10)
    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    req = reflection_pb2.ServerReflectionRequest(list_services="")
    with pytest.raises(grpc.RpcError) as exc:
        next(iter(refl.ServerReflectionInfo(iter([req]), timeout=10)))
    assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(
    ("changes", "code", "named"),
    [
        ({"no-such-param": "1"}, grpc.StatusCode.INVALID_ARGUMENT, "no-such-param"),
        ({"size": "1G"}, grpc.StatusCode.FAILED_PRECONDITION, "size"),
    ],
)
def test_control_configure_rejects(node, changes, code, named):
    _, stub, _ = node()
    with pytest.raises(grpc.RpcError) as exc:
        stub.Configure(pb.ConfigureRequest(changes=changes), timeout=5)
    assert exc.value.code() == code
    assert named in exc.value.details()
    info = stub.GetInfo(pb.GetInfoRequest(), timeout=5)
    assert info.size == SIZE  # nothing applied


def test_control_fan_rpcs_are_unimplemented_on_a_plugin(node):
    _, stub, _ = node()
    calls = [
        lambda: stub.ListMembers(pb.ListMembersRequest(), timeout=5),
        lambda: stub.ReplaceMember(pb.ReplaceMemberRequest(index=0, uri="nbd://x"), timeout=5),
        lambda: stub.MarkMemberFaulty(pb.MarkMemberFaultyRequest(index=0), timeout=5),
        lambda: stub.TrustMember(pb.TrustMemberRequest(index=0), timeout=5),
        lambda: stub.SetRebuild(pb.SetRebuildRequest(), timeout=5),
        lambda: next(stub.WatchRebuild(pb.WatchRebuildRequest(), timeout=5)),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as exc:
            call()
        assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "not a fan" in exc.value.details()


def _poll_until(h, cookies, deadline: float) -> set[int]:
    done: set[int] = set()
    while time.monotonic() < deadline and len(done) < len(cookies):
        h.poll(50)
        done |= {c for c in cookies if c not in done and h.aio_command_completed(c)}
    return done


def test_control_pause_holds_requests_and_resume_releases_them(node):
    p, stub, _ = node()
    h = nbd_connect(p.uri)
    stub.Pause(pb.PauseRequest(flush=True), timeout=5)
    blocks = [bytes([i + 1]) * 4096 for i in range(8)]
    cookies = [
        h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b)), i * 4096)
        for i, b in enumerate(blocks)
    ]
    read_buf = nbd.Buffer(4096)
    cookies.append(h.aio_pread(read_buf, 0))

    assert _poll_until(h, cookies, time.monotonic() + 0.4) == set()
    held = wait_for(
        lambda: (s := stub.GetStats(pb.GetStatsRequest(), timeout=5)).in_flight == 9 and s,
        10,
        "held requests to reach the node",
    )
    assert op(held, "write").count == 0 and op(held, "read").count == 0
    # A second pause must not wait for the held requests (they cannot finish while paused).
    stub.Pause(pb.PauseRequest(), timeout=5)
    # More writes arrive where the first ones' payloads were read: the held ones keep theirs.
    more = [bytes([0x80 + i]) * 4096 for i in range(8)]
    cookies += [
        h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b)), (8 + i) * 4096)
        for i, b in enumerate(more)
    ]
    wait_for(
        lambda: stub.GetStats(pb.GetStatsRequest(), timeout=5).in_flight == 17,
        10,
        "the second writes to be held too",
    )

    stub.Resume(pb.ResumeRequest(), timeout=5)
    assert _poll_until(h, cookies, time.monotonic() + 10) == set(cookies)
    for i, b in enumerate(blocks + more):
        assert h.pread(4096, i * 4096) == b, f"block {i}"
    stats = stub.GetStats(pb.GetStatsRequest(), timeout=5)
    assert op(stats, "write").count == 16  # none lost, none duplicated
    assert op(stats, "write").bytes == 16 * 4096
    assert stats.in_flight == 0
    h.shutdown()


def test_control_pause_holds_a_big_write_out_of_the_store_until_resume(node):
    """A big WRITE's payload is received straight into pages (a landing); held by a pause, it
    is not in the disk yet (a snapshot taken now must not see it), and is after resume."""
    p, stub, _ = node()
    h = nbd_connect(p.uri)
    allocated = lambda: json.loads(  # noqa: E731
        stub.GetInfo(pb.GetInfoRequest(), timeout=5).status_json
    )["allocated_bytes"]
    stub.Pause(pb.PauseRequest(), timeout=5)
    data = os.urandom(1 << 20)
    cookie = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), 1 << 20)
    wait_for(  # libnbd sends the rest of the payload as it is polled
        lambda: h.poll(10) is not None and stub.GetStats(pb.GetStatsRequest()).in_flight == 1,
        10,
        "the write to be held",
    )
    assert allocated() == 0
    stub.Resume(pb.ResumeRequest(), timeout=5)
    assert _poll_until(h, [cookie], time.monotonic() + 10) == {cookie}
    assert allocated() == 1 << 20
    assert h.pread(1 << 20, 1 << 20) == data
    h.shutdown()


def test_control_stats_match_what_the_client_did(node):
    p, stub, _ = node()
    h = nbd_connect(p.uri)
    for i in range(3):
        h.pwrite(b"x" * 4096, i * 4096)
    h.pread(8192, 0)
    h.pread(8192, 8192)
    h.flush()
    stats = stub.GetStats(pb.GetStatsRequest(), timeout=5)
    assert (op(stats, "write").count, op(stats, "write").bytes) == (3, 3 * 4096)
    assert op(stats, "read").bytes == 2 * 8192
    assert op(stats, "flush").count == 1
    assert op(stats, "write").errors == 0
    assert stats.connections_open == 1 and stats.connections_total == 1
    assert len(stats.latency_bounds_seconds) + 1 == len(op(stats, "write").latency_buckets)
    for o in stats.ops:
        assert sum(o.latency_buckets) == o.count
    h.shutdown()
    wait_for(
        lambda: stub.GetStats(pb.GetStatsRequest(), timeout=5).connections_open == 0,
        10,
        "the connection to close",
    )


def test_control_watch_events_follows_state_changes(node):
    _, stub, _ = node()
    events = stub.WatchEvents(pb.WatchEventsRequest(send_current_state=True), timeout=20)
    assert next(events).event.message == "serving"
    stub.Pause(pb.PauseRequest(), timeout=5)
    stub.Resume(pb.ResumeRequest(), timeout=5)
    got = [next(events).event for _ in range(2)]
    assert [(e.kind, e.message) for e in got] == [("state", "paused"), ("state", "serving")]
    assert got[0].time.seconds > 0
    stub.Shutdown(pb.ShutdownRequest(), timeout=5)
    rest = [r.event.message for r in events]  # the stream ends when the node stops
    assert rest[-1] == "stopped"


def test_control_metrics_endpoint_parses(node):
    p, _, _ = node("--metrics", "127.0.0.1:0", "--export-name", "vm1")
    h = nbd_connect(p.uri)
    h.pwrite(b"y" * 1024, 0)
    h.pread(512, 0)
    body = urllib.request.urlopen(f"http://{p.metrics}/metrics", timeout=10).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(body)}
    samples = {
        (s.name, s.labels.get("op")): s
        for f in families.values()
        for s in f.samples
        if s.labels.get("le") is None
    }
    write = samples[("nbdfabric_requests_total", "write")]
    assert write.value == 1
    assert write.labels["kind"] == "memory" and write.labels["export"] == "vm1"
    assert write.labels["node"].startswith("memory")
    assert samples[("nbdfabric_request_bytes_total", "read")].value == 512
    assert samples[("nbdfabric_request_duration_seconds_count", "write")].value == 1
    assert families["nbdfabric_request_duration_seconds"].type == "histogram"
    assert samples[("nbdfabric_connections_open", None)].value == 1
    assert samples[("nbdfabric_up", None)].value == 1
    assert samples[("nbdfabric_export_size_bytes", None)].value == SIZE
    h.shutdown()


def test_control_and_metrics_unix_sockets_go_with_the_node(node, tmp_path):
    metrics = tmp_path / "metrics.sock"
    p, _, _ = node("--metrics", f"unix:{metrics}")
    assert p.metrics == f"unix:{metrics}" and metrics.is_socket()
    control = Path(p.control.removeprefix("unix:"))
    assert control.is_socket()
    p.stop()
    assert not metrics.exists() and not control.exists() and not Path(p.socket).exists()


def test_control_health_command_exit_codes(node, tmp_path):
    p, _, _ = node("--export-name", "vm1")
    ok = ctl("health", p.control)
    assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING")
    assert ctl("health", p.control, "--service", "vm1").returncode == 0
    unknown = ctl("health", p.control, "--service", "nope")
    assert unknown.returncode == 1 and "nope" not in ok.stderr
    absent = ctl("health", f"unix:{tmp_path}/absent.sock", "--timeout", "1")
    assert absent.returncode == 3 and "cannot reach" in absent.stderr
    # The OS's reason, not gRPC's wrapping of it ("failed to connect to all addresses; ...").
    assert absent.stderr.count("No such file or directory") == 1, absent.stderr
    assert "failed to connect" not in absent.stderr and "FAILED_PRECONDITION" not in absent.stderr
    p.stop()
    assert ctl("health", p.control, "--timeout", "1").returncode == 3


def test_control_ctl_json_output(node):
    p, _, _ = node()
    info = ctl("ctl", p.control, "info", "--json")
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["kind"] == "memory" and data["role"] == "plugin" and data["state"] == "serving"
    assert data["size"] == SIZE and data["capabilities"]["writable"] is True
    assert data["capabilities"]["zero"] == "native"
    assert data["status"] == {"allocated_bytes": 0}
    assert data["params"][0]["name"] == "size"
    assert (data["serves_several"], data["exports"]) == (False, [])  # one export: the above
    table = ctl("ctl", p.control, "info").stdout
    assert any(line.startswith("size ") for line in table.splitlines()), table

    h = nbd_connect(p.uri)
    h.pwrite(b"z" * 4096, 0)
    stats = json.loads(ctl("ctl", p.control, "stats", "--json").stdout)
    write = next(o for o in stats["ops"] if o["op"] == "write")
    assert (write["count"], write["bytes"]) == (1, 4096)
    h.shutdown()

    assert ctl("ctl", p.control, "pause").returncode == 0
    state = json.loads(ctl("ctl", p.control, "info", "--json").stdout)["state"]
    assert state == "paused"
    assert ctl("ctl", p.control, "resume").returncode == 0
    assert ctl("ctl", p.control, "flush").returncode == 0
    health = json.loads(ctl("ctl", p.control, "health", "--json").stdout)
    assert health == {"service": "", "status": "SERVING"}

    bad = ctl("ctl", p.control, "set", "size=1G")
    assert bad.returncode == 1 and "FAILED_PRECONDITION" in bad.stderr and "size" in bad.stderr
    members = ctl("ctl", p.control, "members", "--json")
    assert members.returncode == 1 and "not a fan" in members.stderr

    events = ctl("ctl", p.control, "events", "--current", "--count", "1", "--json")
    assert json.loads(events.stdout)["message"] == "serving"

    assert ctl("ctl", p.control, "shutdown").returncode == 0
    assert p.proc.wait(15) == 0


def test_control_ctl_human_output(node):
    p, _, _ = node()
    info = ctl("ctl", p.control, "info")
    assert info.returncode == 0, info.stderr
    assert "memory" in info.stdout and "16M" in info.stdout and p.uri in info.stdout
    stats = ctl("ctl", p.control, "stats")
    assert stats.returncode == 0 and "block_status" in stats.stdout


def test_control_ctl_set_echoes_values_as_the_command_line_spells_them(start_node):
    """`ctl ADDR set` and `ctl ADDR info` show values as `kinds` and the command line spell
    them (`250ms`, `64M`); they said `0.25` and `67108864`, gRPC's seconds and bytes, which
    `--json` keeps."""
    disk = start_node("memory", "1M")
    p = start_node("rate", upstreams=[disk.uri], control=True)
    res = ctl("ctl", p.control, "set", "rate=64M", "burstiness=250ms")
    assert (res.returncode, res.stdout) == (0, "rate=64M, burstiness=250ms\n"), res.stderr
    assert ctl("ctl", p.control, "set", "burstiness=0.001").stdout == "burstiness=1ms\n"
    info = ctl("ctl", p.control, "info").stdout
    assert re.search(r"rate\s+│ 64M\s+│ size", info) and re.search(r"burstiness\s+│ 1ms ", info)
    params = json.loads(ctl("ctl", p.control, "info", "--json").stdout)["params"]
    assert {q["name"]: q["value"] for q in params}["rate"] == "67108864"


@pytest.mark.parametrize(("kind", "wire", "shown"), [
    ("duration", "0.001", "1ms"), ("duration", "0.0025", "2.5ms"), ("duration", "0", "0s"),
    ("duration", "0.0000003", "300ns"), ("duration", "0.00025", "250us"),
    ("duration", "90", "90s"), ("duration", "1.5", "1.5s"), ("size", "67108864", "64M"),
    ("size", "1048577", "1048577"), ("size", "0", "0"), ("errno", "EIO", "EIO"),
    ("boolean", "true", "true"), ("rate", "0.1", "0.1"), ("string", "", ""),
])  # fmt: skip
def test_control_wire_values_shown_as_the_command_line_takes_them(
    kind: str, wire: str, shown: str
) -> None:
    from nodes.values import parse_duration, wire_value_text

    assert wire_value_text(kind, wire) == shown
    if kind == "duration":  # and it reads back as what was sent
        assert abs(parse_duration(shown) - float(wire)) < 1e-12


@pytest.mark.parametrize(
    ("running", "done", "said"),
    [(True, 1 << 29, "running 50.0%"), (False, 1 << 30, "done 100.0%"),
     (False, 1 << 29, "stopped 50.0%")],
)  # fmt: skip
def test_control_rebuild_progress_says_a_finished_rebuild_is_done(
    running: bool, done: int, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ctl ADDR rebuild` / `members`: a rebuild that copied everything said 'stopped 100.0%',
    which reads as one cut short."""
    from nodes.control.cli import show_progress

    show_progress(pb.RebuildProgress(running=running, member_index=1, done_bytes=done,
                                     total_bytes=1 << 30))  # fmt: skip
    assert capsys.readouterr().out.startswith(f"rebuild member 1: {said} (")


def test_control_rebuild_progress_names_parity_s_recheck(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A parity fan's recheck of its own parity after a crash is a rebuild of no member."""
    from nodes.control.cli import show_progress

    show_progress(pb.RebuildProgress(running=True, done_bytes=1 << 20, total_bytes=1 << 22,
                                     detail_json='{"kind": "parity"}'))  # fmt: skip
    assert capsys.readouterr().out.startswith("rebuild (parity recheck): running 25.0% (")


def test_control_members_say_how_to_take_back_a_member_marked_faulty(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`ctl faulty INDEX` keeps a mirror member out, healthy or not, until `ctl replace`; the
    members table showed a healthy 'faulty' member and no way back (`rebuild start` said
    'idle')."""
    from nodes.control.cli import show_members

    uri = "nbd+unix:///?socket=/run/b.sock"
    held = pb.Member(index=1, uri=uri, state="faulty", healthy=True,
                     detail_json=json.dumps({"held": True}))  # fmt: skip
    show_members([pb.Member(index=0, uri="nbd://a/", state="in_sync", healthy=True), held],
                 None, "unix:/run/m.ctl")  # fmt: skip
    out = capsys.readouterr().out
    assert (
        f"member 1 stays out until taken back: nbdfabric ctl unix:/run/m.ctl replace 1 '{uri}'"
        in out
    )
    assert "member 0" not in out
