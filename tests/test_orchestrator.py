"""The orchestrator on real processes: `nbdfabric up --detach` brings up multi-node fabrics in
a tmp run dir, real clients (qemu-img, nbdcopy) put data through every export, and we check
restarts after kill -9, re-apply diffs (pids compared), `set`, and that `down` leaves nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import NBDFABRIC, ROOT, alive, nbd_connect, run, sha, wait_for

from bench.http_server import HttpServer

CHAIN = """\
name: f
nodes:
  disk: {kind: memory, params: {size: 8M}}
  slow: {kind: delay, upstream: disk, params: {delay-read: 1ms}}
  m0: {kind: memory, params: {size: 4M}}
  m1: {kind: memory, params: {size: 4M}}
  raid: {kind: stripe, upstreams: [m0, m1]}
exports:
  vm1: {node: slow, listen: ["unix:${SOCKDIR}/vm1.sock", "127.0.0.1:0"]}
  vm2: {node: raid, listen: ["unix:${SOCKDIR}/vm2.sock"]}
"""


class Fabric:
    def __init__(self, tmp_path: Path, text: str = CHAIN) -> None:
        self.dir = tmp_path
        self.file = tmp_path / "fabric.yaml"
        self.file.write_text(text)
        self.env = {**os.environ, "NBDFABRIC_RUN_DIR": str(tmp_path / "r"),
                    "SOCKDIR": str(tmp_path)}  # fmt: skip
        self.pids: set[int] = set()

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [sys.executable, "-m", "nodes.cli", *args],
            cwd=self.dir,
            env=self.env,
            capture_output=True,
            text=True,
        )
        if check and res.returncode != 0:
            raise AssertionError(
                f"nbdfabric {args} exited {res.returncode}\n{res.stdout}{res.stderr}"
            )
        return res

    def up(self) -> str:
        out = self.cli("up", "--detach", str(self.file)).stdout
        self.status()
        return out

    def status(self) -> dict[str, dict[str, Any]]:
        nodes = json.loads(self.cli("status", "--json").stdout)
        self.pids |= {n["pid"] for n in nodes if n["pid"]}
        pidfile = self.dir / "r" / "f" / "orchestrator.pid"
        if pidfile.exists():
            self.pids.add(int(pidfile.read_text()))
        return {n["name"]: n for n in nodes}

    def uri(self, export: str, prefix: str = "nbd+unix") -> str:
        node = next(n for n in self.status().values() if n["export_name"] == export)
        return next(u for u in node["export_uris"] if u.startswith(prefix))


def assert_all_gone(tmp_path: Path, pids: set[int]) -> None:
    """After `down`: every process of the fabric exits, and no socket is left under tmp_path."""
    for pid in pids:
        wait_for(lambda pid=pid: not alive(pid), 30, f"pid {pid} to exit")
    assert [p for p in tmp_path.rglob("*") if p.is_socket()] == []


@pytest.fixture
def fabric(tmp_path: Path) -> Iterator[Fabric]:
    fab = Fabric(tmp_path)
    yield fab
    fab.cli("down", check=False)


def write_read(tmp_path: Path, uri: str, size: int, read_uri: str | None = None) -> str:
    """Write `size` random bytes with qemu-img, read them back with nbdcopy; their checksum."""
    src, back = tmp_path / "src.img", tmp_path / "back.img"
    data = os.urandom(size)
    src.write_bytes(data)
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri])
    run(["nbdcopy", read_uri or uri, str(back)])
    got = back.read_bytes()[:size]
    assert sha(got) == sha(data)
    return sha(data)


def read_sha(tmp_path: Path, uri: str, size: int) -> str:
    back = tmp_path / "again.img"
    run(["nbdcopy", uri, str(back)])
    return sha(back.read_bytes()[:size])


def test_orchestrator_up_serves_every_export_and_down_leaves_nothing(
    fabric: Fabric, tmp_path: Path
) -> None:
    out = fabric.up()
    assert f"vm1: nbd+unix:///vm1?socket={tmp_path}/vm1.sock" in out
    assert "vm1: nbd://127.0.0.1:" in out
    assert f"vm2: nbd+unix:///vm2?socket={tmp_path}/vm2.sock" in out

    nodes = fabric.status()
    assert list(nodes) == ["disk", "slow", "m0", "m1", "raid"]
    for n in nodes.values():
        assert (n["state"], n["health"], n["restarts"]) == ("running", "SERVING", 0), n
        assert n["pid"] > 0 and alive(n["pid"])
    assert nodes["slow"]["kind"] == "delay" and nodes["raid"]["export_name"] == "vm2"

    write_read(tmp_path, fabric.uri("vm1"), 1 << 20, read_uri=fabric.uri("vm1", "nbd://"))
    write_read(tmp_path, fabric.uri("vm2"), 8 << 20)

    text = fabric.cli("status").stdout
    assert "NODE" in text and "RESTARTS" in text and "raid" in text
    # A node paused by hand (to snapshot what is under it) shows so; health says SERVING.
    control = nodes["slow"]["control"]
    run([*NBDFABRIC, "ctl", control, "pause"])
    assert (fabric.status()["slow"]["state"], fabric.status()["slow"]["health"]) == (
        "paused", "SERVING"
    )  # fmt: skip
    run([*NBDFABRIC, "ctl", control, "resume"])
    assert fabric.status()["slow"]["state"] == "running"

    pids = set(fabric.pids)
    assert len(pids) == 6  # five nodes and the supervisor
    fabric.cli("down")
    assert_all_gone(tmp_path, pids)
    assert fabric.cli("status", check=False).returncode == 3
    # The logs stay in the run dir; that is no fabric ("down (0 processes stopped)").
    assert fabric.cli("down").stdout == "fabric f is not running\n"
    for command in (["events"], ["logs", "--events"]):  # each names the fabric, as down does
        res = fabric.cli(*command, check=False)
        assert (res.returncode, res.stderr.split(": ", 1)[1]) == (3, "fabric f is not running\n")


def test_orchestrator_up_detach_shows_progress_on_stderr(fabric: Fabric) -> None:
    """`up -d` says on stderr what it waits for, a line per node as it starts, runs and
    serves (docker compose's plain progress), upstreams before their dependents; a re-apply
    too. It was silent for the seconds the nodes took; stdout is as before."""
    res = fabric.cli("up", "--detach", str(fabric.file))
    assert res.stdout.startswith("fabric f: 5 nodes up (supervisor pid "), res.stdout
    assert "\r" not in res.stderr and "\x1b" not in res.stderr, "no redrawing"
    lines = res.stderr.splitlines()
    pids = {n: s["pid"] for n, s in fabric.status().items()}

    def at(node: str, word: str) -> int:
        return lines.index(f" Node {node:<4}  {word}")

    for node, pid in pids.items():
        assert at(node, "Starting") < at(node, f"Started (pid {pid})") < at(node, "Healthy")
    for upstream, node in (("disk", "slow"), ("m0", "raid"), ("m1", "raid")):
        assert at(upstream, "Healthy") < at(node, "Starting")
    assert len(lines) == 15, res.stderr

    fabric.file.write_text(CHAIN.replace("delay-read: 1ms", "delay-read: 3ms")
                           .replace("size: 4M}}\n  raid", "size: 6M}}\n  raid"))  # fmt: skip
    res = fabric.cli("up", "--detach", str(fabric.file))
    assert "m1: restart (params changed: size)" in res.stdout
    m1 = fabric.status()["m1"]["pid"]
    lines = res.stderr.splitlines()
    assert [x for x in lines if x.startswith(" Node m1 ")] == [
        " Node m1    Stopped", " Node m1    Starting", f" Node m1    Started (pid {m1})",
        " Node m1    Healthy"], res.stderr  # fmt: skip
    assert [x for x in lines if not x.startswith(" Node m1 ")] == [
        " Node slow  Configured (delay-read=3ms)"], res.stderr  # fmt: skip


def test_orchestrator_restarts_killed_node_and_export_serves_again(
    fabric: Fabric, tmp_path: Path
) -> None:
    fabric.up()
    digest = write_read(tmp_path, fabric.uri("vm1"), 1 << 20)
    before = fabric.status()
    os.kill(before["slow"]["pid"], signal.SIGKILL)

    def restarted() -> bool:
        n = fabric.status()["slow"]
        return n["restarts"] == 1 and n["health"] == "SERVING" and n["pid"] != before["slow"]["pid"]

    wait_for(restarted, 60, "slow to be restarted")
    after = fabric.status()
    assert after["disk"]["pid"] == before["disk"]["pid"]  # upstreams are left alone
    # The data lives in `disk`: the restarted filter serves it again, over TCP too.
    assert read_sha(tmp_path, fabric.uri("vm1", "nbd://"), 1 << 20) == digest
    events = fabric.cli("logs", "--events").stdout
    assert "slow: exited: killed by SIGKILL" in events  # not "exited with status -9"
    assert "slow: restarted: pid" in events


HUNG = """\
name: f
nodes:
  disk:
    kind: memory
    params: {size: 1M}
    healthcheck: {interval: 200ms, timeout: 300ms, retries: 3}
exports:
  vm: {node: disk, listen: ["unix:${SOCKDIR}/vm.sock"]}
"""


def test_orchestrator_restarts_a_hung_node_after_its_healthcheck_retries(tmp_path: Path) -> None:
    """A node that stops answering (SIGSTOP: alive, but it neither serves nor answers health
    checks) is restarted after `retries` unanswered checks in a row, at its `interval` and
    `timeout`; the stop wakes it (SIGCONT after SIGTERM) so it exits by itself, not SIGKILLed
    after the stop grace."""
    fab = Fabric(tmp_path, HUNG)
    try:
        fab.up()
        before = fab.status()["disk"]
        os.kill(before["pid"], signal.SIGSTOP)
        wait_for(lambda: restarted(fab, "disk", before["pid"]), 60, "disk restarted")
        events = fab.cli("logs", "--events").stdout
        assert "disk: unhealthy: does not answer health checks" in events, events
        assert "disk: killed" not in events, events
        write_read(tmp_path, fab.uri("vm"), 1 << 20)
    finally:
        fab.cli("down", check=False)


OPERATED = """\
name: f
nodes:
  a: {kind: file, params: {file: a.img}}
  b: {kind: file, params: {file: b.img}}
  m: {kind: mirror, upstreams: [a, b]}
  top: {kind: nbd, upstream: m}
exports:
  vm: {node: top, listen: ["unix:${SOCKDIR}/vm.sock"]}
"""


def test_orchestrator_stop_start_restart_nodes_as_compose_does(tmp_path: Path) -> None:
    """`stop b`: the mirror member stays down (supervision leaves it) and the mirror serves
    degraded; `start b` brings it back and the mirror resyncs what was written meanwhile, so
    both files hold it; `restart top` swaps the proxy's process, the data still served; names
    the fabric does not have are refused; `up` starts a node left stopped, as compose does."""
    size = 4 << 20
    for disk in ("a.img", "b.img"):
        (tmp_path / disk).write_bytes(bytes(size))
    fab = Fabric(tmp_path, OPERATED)
    try:
        fab.up()
        uri = fab.uri("vm")
        before = fab.status()
        res = fab.cli("stop", "b")
        assert res.stdout == "b: stopped\n"
        assert fab.cli("stop", "b").stdout == "b: already stopped\n"

        def member_b() -> str:
            return str(fab.status()["m"]["members"][1]["state"])

        wait_for(lambda: member_b() == "faulty", 30, "the mirror to mark b faulty")
        digest = write_read(tmp_path, uri, size)  # served degraded, by a alone
        time.sleep(2)  # a few health checks: supervision does not bring b back
        assert (fab.status()["b"]["state"], fab.status()["b"]["pid"]) == ("stopped", 0)
        res = fab.cli("start", "b", "a")
        assert res.stdout.startswith("b: started (pid ") and "a: already running" in res.stdout
        wait_for(lambda: member_b() == "in_sync", 60, "b resynced")
        assert sha((tmp_path / "b.img").read_bytes()) == digest  # the writes b missed
        assert sha((tmp_path / "a.img").read_bytes()) == digest
        started = fab.status()["b"]["pid"]
        os.kill(started, signal.SIGKILL)  # supervised again: restarted
        wait_for(lambda: restarted(fab, "b", started), 60, "b restarted after a crash")
        res = fab.cli("restart", "top")
        assert res.stdout.startswith("top: restarted (pid ")
        after = fab.status()
        assert after["top"]["pid"] not in (0, before["top"]["pid"])
        assert after["m"]["pid"] == before["m"]["pid"]  # a restart touches what it names
        assert read_sha(tmp_path, uri, size) == digest
        bad = fab.cli("restart", "nope", check=False)
        assert bad.returncode == 1
        assert "no node named 'nope' (nodes: a, b, m, top)" in bad.stderr
        fab.cli("stop", "top")
        res = fab.cli("up", "--detach", str(fab.file))
        assert "top: restart (not running: stopped)" in res.stdout, res.stdout
        assert read_sha(tmp_path, uri, size) == digest
        events = fab.cli("logs", "--events").stdout
        assert "b: stopped" in events and "top: stopped" in events
    finally:
        fab.cli("down", check=False)


def test_orchestrator_a_large_log_is_kept_as_old_when_its_node_starts(tmp_path: Path) -> None:
    """A node's log holds every run; grown past 8 MiB, it is kept as NODE.log.old (one
    generation) when the node starts again and a new one begun, so a long-lived fabric does
    not fill its run dir. `logs` shows the new one; `down` keeps both."""
    from orchestrator.backends.process import LOG_ROTATE_BYTES

    two = "name: f\nnodes:\n  a: {kind: memory, params: {size: 1M}}\n  b: {kind: null}\n"
    fab = Fabric(tmp_path, two)
    try:
        fab.up()
        log = tmp_path / "r" / "f" / "a.log"
        old = log.with_name("a.log.old")
        with log.open("ab") as f:
            f.write(b"x" * (LOG_ROTATE_BYTES + 1) + b"\nthe end of the old log\n")
        fab.cli("restart", "a")
        assert old.read_bytes().endswith(b"the end of the old log\n")
        assert log.stat().st_size < 4096 and log.read_text().startswith("--- nbdfabric: ")
        assert "the end of the old log" not in fab.cli("logs", "a").stdout
        fab.cli("restart", "b")  # a small log stays as it is
        assert not log.with_name("b.log.old").exists()
    finally:
        fab.cli("down", check=False)
    assert old.exists() and log.exists()


#: Two nodes, each exported on a port picked at their first start.
PORT0 = """\
name: f
nodes:
  disk: {kind: file, params: {file: disk.img}, max_restarts: 20}
  top: {kind: delay, upstream: disk, params: {delay-read: 1ms}, max_restarts: 20}
exports:
  low: {node: disk, listen: ["127.0.0.1:0"]}
  high: {node: top, listen: ["127.0.0.1:0"]}
"""


def restarted(fab: Fabric, node: str, pid: int) -> bool:
    """Whether `node`, which ran as `pid`, serves again as another process."""
    n = fab.status()[node]
    return n["health"] == "SERVING" and n["pid"] not in (0, pid)


def test_orchestrator_restart_keeps_the_port_0_gave(tmp_path: Path) -> None:
    """A node exported on port 0 is restarted on the port its first start was given: clients
    (and the URIs `up` printed) keep working. Each restart picked another port."""
    (tmp_path / "disk.img").write_bytes(bytes(2 << 20))
    fab = Fabric(tmp_path, PORT0)
    try:
        out = fab.up()
        uris = {e: fab.uri(e, "nbd://") for e in ("low", "high")}
        assert all(f"{e}: {uri}" in out for e, uri in uris.items()), out
        digest = write_read(tmp_path, uris["high"], 2 << 20)
        for node in ("disk", "top"):  # the upstream under a filter, then the filter
            pid = fab.status()[node]["pid"]
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda node=node, pid=pid: restarted(fab, node, pid), 60, f"{node} back")
            wait_for(lambda: fab.status()["top"]["health"] == "SERVING", 30, "top to serve")
            assert {e: fab.uri(e, "nbd://") for e in uris} == uris, f"after {node} restarted"
            assert read_sha(tmp_path, uris["high"], 2 << 20) == digest, f"after {node} restarted"
            assert read_sha(tmp_path, uris["low"], 2 << 20) == digest
        assert {n["name"]: n["restarts"] for n in fab.status().values()} == {"disk": 1, "top": 1}
    finally:
        fab.cli("down", check=False)


def take_port(port: int) -> socket.socket:
    """A socket listening on 127.0.0.1:`port`, bound as soon as the port is free."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def bound() -> bool:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True

    wait_for(bound, 10, f"port {port} to be free", interval=0.001)
    sock.listen()
    return sock


def test_orchestrator_restart_says_when_its_port_is_taken(tmp_path: Path) -> None:
    """Another program took the port while the node was down: the restart says so, naming the
    port and why it wants that one, and retries; once the port is free, the node serves there."""
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    fab = Fabric(tmp_path, PORT0)
    try:
        fab.up()
        uri = fab.uri("high", "nbd://")
        port = int(uri.rsplit(":", 1)[1].split("/")[0])
        pid = fab.status()["top"]["pid"]
        os.kill(pid, signal.SIGKILL)
        with take_port(port):  # before the restart (0.1 s later) does
            said = (f"top: start-failed: node 'top' cannot listen on 127.0.0.1:{port}: "
                    "Address already in use (its export asked for 127.0.0.1:0 and was given "
                    "this port at its first start")  # fmt: skip
            wait_for(lambda: said in fab.cli("logs", "--events").stdout, 30, "start-failed",
                     interval=0.3)  # fmt: skip
        wait_for(lambda: restarted(fab, "top", pid), 60, "top to serve again")
        assert fab.uri("high", "nbd://") == uri
        assert run(["nbdinfo", "--size", uri]).stdout.strip() == str(1 << 20)
    finally:
        fab.cli("down", check=False)


def test_orchestrator_reapply_restarts_only_the_changed_node(
    fabric: Fabric, tmp_path: Path
) -> None:
    fabric.up()
    before = fabric.status()
    edited = CHAIN.replace("size: 4M}}\n  raid", "size: 6M}}\n  raid")
    fabric.file.write_text(edited)
    out = fabric.cli("up", "--detach", str(fabric.file)).stdout
    assert "m1: restart (params changed: size)" in out
    after = fabric.status()
    changed = {n for n in before if before[n]["pid"] != after[n]["pid"]}
    assert changed == {"m1"}
    assert after["m1"]["health"] == "SERVING"
    # A live param only: configured in place, no restart at all.
    fabric.file.write_text(edited.replace("delay-read: 1ms", "delay-read: 3ms"))
    out = fabric.cli("up", "--detach", str(fabric.file)).stdout
    assert "slow: configure (live params: delay-read)" in out
    final = fabric.status()
    assert {n: final[n]["pid"] for n in final} == {n: after[n]["pid"] for n in after}
    assert param_value(final["slow"]["control"], "delay-read") in ("0.003", "3ms")
    write_read(tmp_path, fabric.uri("vm2"), 2 << 20)


def test_orchestrator_reapply_starts_what_an_earlier_apply_failed_to(
    fabric: Fabric, tmp_path: Path
) -> None:
    """An edit that adds a node which cannot start (its file is missing) fails, and the node
    over it is never started; once the file is there, `up` again starts both. It said
    `unchanged` for the failed one and died on the other (`Unexpected <class 'KeyError'>`)."""
    fabric.up()
    disk = tmp_path / "late.img"
    fabric.file.write_text(
        CHAIN.replace("exports:", f"  late: {{kind: file, params: {{file: {disk}}}, "
                      "restart: never}\n  over: {kind: cow, upstream: late}\nexports:")
    )  # fmt: skip
    res = fabric.cli("up", "--detach", str(fabric.file), check=False)
    assert res.returncode == 1 and "node 'late' exited" in res.stderr, res.stderr
    # `status` says why, with the node's last words.
    assert (f"late: failed (exited with status 1): nbdfabric node file: {disk}: No such file "
            "or directory; `nbdfabric logs late`") in fabric.cli("status").stdout  # fmt: skip
    disk.write_bytes(bytes(1 << 20))
    out = fabric.cli("up", "--detach", str(fabric.file)).stdout
    assert "late: restart (not running: failed)" in out and "over: add" in out, out
    nodes = fabric.status()
    for name in ("late", "over", "disk"):
        assert (nodes[name]["state"], nodes[name]["health"]) == ("running", "SERVING")
    assert "unchanged" in fabric.cli("up", "--dry-run", str(fabric.file)).stdout


#: A filter over a memory node, exported; the tests below edit the memory's size.
OVER_MEMORY = """\
name: f
nodes:
  src: {kind: memory, params: {size: 16M}}
  top: {kind: nbd, upstream: src}
exports:
  vm: {node: top, listen: ["unix:${SOCKDIR}/vm.sock"]}
"""


def reapply(fab: Fabric, text: str) -> subprocess.CompletedProcess[str]:
    fab.file.write_text(text)
    return fab.cli("up", "--detach", str(fab.file))


def test_orchestrator_reapply_restarts_the_filter_over_a_node_that_now_offers_less(
    tmp_path: Path,
) -> None:
    """A re-apply restarts a memory node smaller: the filter over it would not take it back
    (its clients were promised 16M) and served EIO until restarted by hand. The apply restarts
    it too, saying why, and the export serves 8M."""
    fab = Fabric(tmp_path, OVER_MEMORY)
    try:
        fab.up()
        uri = fab.uri("vm")
        write_read(tmp_path, uri, 1 << 20)
        before = fab.status()
        res = reapply(fab, OVER_MEMORY.replace("16M", "8M"))
        assert "src: restart (params changed: size)" in res.stdout, res.stdout
        why = "upstream src offers less: size 16777216 -> 8388608"
        assert f"top: restart ({why})" in res.stdout, res.stdout
        assert f" Node top  Restart needed: {why}" in res.stderr.splitlines(), res.stderr
        after = fab.status()
        assert after["top"]["pid"] != before["top"]["pid"]
        assert (after["top"]["state"], after["top"]["health"]) == ("running", "SERVING")
        assert run(["nbdinfo", "--size", uri]).stdout.strip() == str(8 << 20)
        write_read(tmp_path, uri, 8 << 20)  # all of it, without an error
        assert f"top: restart-needed: {why}" in fab.cli("logs", "--events").stdout
    finally:
        fab.cli("down", check=False)


def test_orchestrator_reapply_leaves_the_filter_over_a_node_that_offers_as_much(
    tmp_path: Path,
) -> None:
    """A node restarted bigger, or with the same offer, is taken back by the filter over it:
    the filter is not restarted (its clients keep their connections). Nor when it shrinks
    back to the size the filter started with: the filter holds it to that first offer, not
    to the bigger one in between."""
    fab = Fabric(tmp_path, OVER_MEMORY)
    try:
        fab.up()
        uri = fab.uri("vm")
        write_read(tmp_path, uri, 1 << 20)
        pids = {n: s["pid"] for n, s in fab.status().items()}
        bigger = OVER_MEMORY.replace("16M", "32M")
        for text in (
            bigger,
            bigger.replace("size: 32M}", "size: 32M}, poll_max_us: 10"),
            OVER_MEMORY,
        ):
            res = reapply(fab, text)
            assert "src: restart" in res.stdout and "top: unchanged" in res.stdout, res.stdout
            after = fab.status()
            assert after["src"]["pid"] != pids["src"]
            assert after["top"]["pid"] == pids["top"]
            pids = {n: s["pid"] for n, s in after.items()}
        assert "offers less" not in fab.cli("logs", "--events").stdout
        write_read(tmp_path, uri, 16 << 20)  # served by the same filter, without an error
    finally:
        fab.cli("down", check=False)


def test_orchestrator_a_node_back_from_a_crash_offering_less_has_its_filter_restarted(
    tmp_path: Path,
) -> None:
    """A file node whose file shrank while it ran comes back smaller after a crash: the filter
    over it would not take it back (and served EIO until its own health failed long enough).
    The supervisor restarts the filter as soon as the node is back, saying why."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(16 << 20))
    file_node = "{kind: file, params: {file: disk.img}}"
    fab = Fabric(tmp_path, OVER_MEMORY.replace("{kind: memory, params: {size: 16M}}", file_node))
    try:
        fab.up()
        uri = fab.uri("vm")
        write_read(tmp_path, uri, 1 << 20)
        before = fab.status()
        os.truncate(disk, 8 << 20)  # the running node still serves 16M
        os.kill(before["src"]["pid"], signal.SIGKILL)
        wait_for(lambda: restarted(fab, "src", before["src"]["pid"]), 60, "src back")
        wait_for(lambda: restarted(fab, "top", before["top"]["pid"]), 30, "top restarted")
        why = "upstream src offers less: size 16777216 -> 8388608"
        assert f"top: restart-needed: {why}" in fab.cli("logs", "--events").stdout
        assert run(["nbdinfo", "--size", uri]).stdout.strip() == str(8 << 20)
        write_read(tmp_path, uri, 8 << 20)  # all of it, without an error
        assert fab.status()["top"]["restarts"] == 0  # restarted over src, not for a failure
    finally:
        fab.cli("down", check=False)


CASCADE = """\
name: f
nodes:
  src: {kind: memory, params: {size: 16M}}
  mid: {kind: offset, upstream: src, params: {offset: 1M}}
  top: {kind: nbd, upstream: mid}
  spare: {kind: memory, params: {size: 1M}}
  cat: {kind: concat, upstreams: [src, spare]}
exports:
  vm: {node: top, listen: ["unix:${SOCKDIR}/vm.sock"]}
"""


def test_orchestrator_reapply_restarts_filters_down_the_chain_but_not_a_fan(
    tmp_path: Path,
) -> None:
    """memory -> offset -> nbd: the memory shrinks, so the offset restarts and serves less in
    turn, so the nbd proxy over it restarts too. A fan over the memory is not restarted (a new
    process would forget its members' states): it keeps the member out, and an event says so."""
    fab = Fabric(tmp_path, CASCADE)
    try:
        fab.up()
        uri = fab.uri("vm")
        assert run(["nbdinfo", "--size", uri]).stdout.strip() == str(15 << 20)
        before = fab.status()
        res = reapply(fab, CASCADE.replace("16M", "8M"))
        assert "mid: restart (upstream src offers less: size 16777216 -> 8388608)" in res.stdout
        assert "top: restart (upstream mid offers less: size 15728640 -> 7340032)" in res.stdout
        assert "cat: unchanged" in res.stdout and "spare: unchanged" in res.stdout, res.stdout
        after = fab.status()
        changed = {n for n in before if before[n]["pid"] != after[n]["pid"]}
        assert changed == {"src", "mid", "top"}
        assert run(["nbdinfo", "--size", uri]).stdout.strip() == str(7 << 20)
        write_read(tmp_path, uri, 7 << 20)
        said = ("cat: member-offers-less: member src offers less (size 16777216 -> 8388608): "
                "the fan keeps it out")  # fmt: skip
        assert said in fab.cli("logs", "--events").stdout
    finally:
        fab.cli("down", check=False)


def test_orchestrator_relative_unix_listen_is_beside_the_file(tmp_path: Path) -> None:
    """`listen: [unix:vm.sock]` is a socket beside the topology file, and `up` and `status`
    print its URI with the full path: it said `socket=vm.sock`, which a client run from
    anywhere but the file's directory could not use (up -f sub/fabric.yaml)."""
    sub = tmp_path / "sub"
    sub.mkdir()
    fab = Fabric(sub, "name: f\nnodes:\n  disk: {kind: memory, params: {size: 1M}}\n"
                 "exports:\n  vm: {node: disk, listen: ['unix:vm.sock']}\n")  # fmt: skip
    fab.dir = tmp_path  # the operator's directory
    uri = f"nbd+unix:///vm?socket={sub}/vm.sock"
    try:
        assert f"vm: {uri}" in fab.cli("up", "--detach", str(fab.file)).stdout
        assert f"export vm: {uri}" in fab.cli("status", "-f", str(fab.file)).stdout
        assert run(["nbdinfo", "--size", uri]).stdout.strip() == str(1 << 20)
    finally:
        fab.cli("down", "-f", str(fab.file), check=False)


WORKERS = """\
name: f
nodes:
  disk: {kind: memory, params: {size: 8M}, workers: 2}
  proxy: {kind: nbd, upstream: disk, workers: 2}
exports:
  vm1: {node: proxy, listen: ["unix:${SOCKDIR}/vm1.sock"]}
"""


def test_orchestrator_runs_nodes_with_workers(tmp_path: Path) -> None:
    """`workers: 2`: each node is a supervisor with two workers and a control process; the
    orchestrator watches it through that one endpoint, and a worker killed is the node's own
    business (another worker serves, and the node replaces it), not a restart."""
    fabric = Fabric(tmp_path, WORKERS)
    try:
        fabric.up()
        nodes = fabric.status()
        for n in nodes.values():
            assert (n["state"], n["health"], n["restarts"]) == ("running", "SERVING", 0), n
        digest = write_read(tmp_path, fabric.uri("vm1"), 2 << 20)
        proxy = nodes["proxy"]
        info = json.loads(
            subprocess.run(
                [sys.executable, "-m", "nodes.cli", "ctl", proxy["control"], "--json", "info"],
                capture_output=True, text=True, check=True, cwd=ROOT,
            ).stdout
        )  # fmt: skip
        workers = [w["pid"] for w in info["status"]["workers"]]
        assert len(workers) == 2 and info["pid"] == proxy["pid"]
        os.kill(workers[0], signal.SIGKILL)
        wait_for(lambda: not alive(workers[0]), 10, "the worker to die")
        assert read_sha(tmp_path, fabric.uri("vm1"), 2 << 20) == digest  # the other one serves
        after = fabric.status()
        assert (after["proxy"]["pid"], after["proxy"]["restarts"]) == (proxy["pid"], 0)
        # Back to one process: a restart, announced with its reason.
        fabric.file.write_text(WORKERS.replace(", workers: 2}\n  proxy", "}\n  proxy"))
        out = fabric.cli("up", "--detach", str(fabric.file)).stdout
        assert "disk: restart (workers 2 -> 1)" in out
        pids = set(fabric.pids) | set(workers)
    finally:
        fabric.cli("down", check=False)
    assert_all_gone(tmp_path, pids)


def test_orchestrator_cdi_style_import_from_http(tmp_path: Path) -> None:
    """compose/k8s-import.yaml's shape on local processes: http source -> rate -> retry, and
    qemu-img converting the export into a qcow2 that compares equal to the served image."""
    www = tmp_path / "www"
    www.mkdir()
    image = www / "disk.img"
    image.write_bytes(os.urandom(3 << 20))
    server = HttpServer(www)
    fabric = Fabric(tmp_path, IMPORT_TOPOLOGY.replace("URL", server.url("files")))
    try:
        fabric.up()
        nodes = fabric.status()
        assert [n["kind"] for n in nodes.values()] == ["http", "rate", "retry"]
        assert all(n["health"] == "SERVING" for n in nodes.values())
        target = tmp_path / "imported.qcow2"
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", fabric.uri("disk"), str(target)])
        run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(image), str(target)])
    finally:
        fabric.cli("down", check=False)
        server.stop()


IMPORT_TOPOLOGY = """\
name: f
nodes:
  source: {kind: http, params: {url: "URL"}}
  throttle: {kind: rate, upstream: source, params: {rate: 200M}}
  retries: {kind: retry, upstream: throttle}
exports:
  disk: {node: retries, listen: ["unix:${SOCKDIR}/disk.sock"]}
"""


def param_value(control: str, name: str) -> str:
    import grpc

    from nodes.control.rpc.nbdfabric.v1 import node_pb2, node_pb2_grpc

    with grpc.insecure_channel(control) as ch:
        info = node_pb2_grpc.NodeServiceStub(ch).GetInfo(node_pb2.GetInfoRequest(), timeout=10)
    return next(p.value for p in info.params if p.name == name)


def test_orchestrator_set_changes_live_param_and_refuses_fixed(fabric: Fabric) -> None:
    fabric.up()
    pid = fabric.status()["slow"]["pid"]
    fabric.cli("set", "slow", "delay-read=7ms")
    slow = fabric.status()["slow"]
    assert slow["pid"] == pid
    assert param_value(slow["control"], "delay-read") in ("0.007", "7ms")
    res = fabric.cli("set", "disk", "size=1G", check=False)
    assert res.returncode == 1
    assert "memory: size cannot change while the node serves" in res.stderr
    res = fabric.cli("set", "nope", "x=1", check=False)
    assert "no node named 'nope'" in res.stderr


def test_orchestrator_invalid_topology_starts_nothing(tmp_path: Path) -> None:
    fab = Fabric(tmp_path, CHAIN.replace("upstreams: [m0, m1]", "upstreams: [m0]"))
    res = fab.cli("up", "--detach", str(fab.file), check=False)
    assert res.returncode == 1
    assert "nodes.raid.upstreams: stripe is a fan: it needs at least 2 members" in res.stderr
    assert not (tmp_path / "r").exists()


@contextlib.contextmanager
def foreground_up(
    fab: Fabric, stderr: int = subprocess.STDOUT, until: str = "Ctrl-C stops it"
) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """`nbdfabric up` in the foreground, read until a line has `until` (by default: until it
    says the fabric is up; "" stops after the first line); the lines so far come with it.
    Killed if it still runs at the end, and what it left brought down."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "nodes.cli", "up", str(fab.file)],
        cwd=ROOT,
        env=fab.env,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if until in line:
                break
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.kill()
        fab.cli("down", check=False)  # what an `up` killed by a signal left


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_orchestrator_foreground_up_stops_in_order_on_signal(tmp_path: Path, sig: int) -> None:
    """Ctrl-C, or the terminal closing (SIGHUP: the nodes, in sessions of their own, outlived
    the `up` it killed)."""
    fab = Fabric(tmp_path)
    with foreground_up(fab) as (proc, lines):
        assert any("Ctrl-C" in x for x in lines), "".join(lines)
        pids = {n["pid"] for n in fab.status().values()}
        assert len(pids) == 5
        proc.send_signal(sig)
        assert proc.stdout is not None
        rest = proc.stdout.read()
        assert proc.wait() == 0, rest
    stops = [line.split()[1] for line in rest.splitlines() if line.endswith(": stopped")]
    assert stops.index("slow:") < stops.index("disk:")  # dependents first
    assert stops.index("raid:") < stops.index("m0:")
    for pid in pids:
        assert not alive(pid)
    assert [p for p in tmp_path.rglob("*") if p.is_socket()] == []


@pytest.mark.parametrize("when", ["starting", "up"])
def test_orchestrator_foreground_up_stops_when_its_output_is_gone(
    tmp_path: Path, when: str
) -> None:
    """`nbdfabric up fabric.yaml | tee log`, and the tee is gone (its terminal closed), while
    the fabric starts or once it is up: the fabric goes on starting and serving (a log
    reader's end is no reason to stop storage), what `up` can no longer show is dropped
    without an error, and a SIGTERM stops it as always, exit 0. Before, a line that met the
    closed pipe while the fabric started or after ended `up` (exit 141), and the fabric with
    it; before that, saying "stopping..." into the closed pipe failed before the stop was
    started, and SIGTERM did nothing."""
    fab = Fabric(tmp_path)
    until = "" if when == "starting" else "Ctrl-C stops it"
    with foreground_up(fab, stderr=subprocess.PIPE, until=until) as (proc, _):
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        wait_for(
            lambda: [n["health"] for n in fab.status().values()] == ["SERVING"] * 5,
            60,
            "every node serving",
        )
        pids = {n["pid"] for n in fab.status().values()}
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        errors = proc.stderr.read()
        assert proc.wait(30) == 0, errors
        assert "Error" not in errors and "Traceback" not in errors, errors
        for pid in pids:
            assert not alive(pid)


#: A node that takes --upstream-timeout (30 s) to fail: its upstream refuses connections.
SLOW_START = """\
name: f
nodes:
  disk: {kind: memory, params: {size: 1M}}
  waits: {kind: cow, upstream: "nbd://127.0.0.1:1/"}
  over: {kind: cow, upstream: disk}
"""


def starting(fab: Fabric, node: str) -> bool:
    """Whether the fabric (up, or still coming up) is starting `node`."""
    if fab.cli("status", check=False).returncode != 0:
        return False
    return fab.status().get(node, {}).get("state") == "starting"


@pytest.mark.parametrize("detach", [False, True], ids=["foreground", "detached"])
def test_orchestrator_ctrl_c_during_up_stops_the_fabric_at_once(
    tmp_path: Path, detach: bool
) -> None:
    """Ctrl-C while a node is still starting: `up` stops what it started within seconds and
    exits 130. The foreground one waited for the start to fail (30 s), and a detached one
    exited but left its supervisor bringing the fabric up."""
    fab = Fabric(tmp_path, SLOW_START)
    args = ["up", *(["--detach"] if detach else []), str(fab.file)]
    command = [sys.executable, "-m", "nodes.cli", *args]
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=fab.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # As from a terminal: run from a shell's background job (`make test &`), the tests
        # inherit SIGINT ignored, and so would `up` (Python then raises no KeyboardInterrupt).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        wait_for(lambda: starting(fab, "waits"), 30, "node waits to be starting")
        pids = set(fab.pids)
        proc.send_signal(signal.SIGINT)
        # Under 25 s: the node's start would have held it 30 s (--upstream-timeout). Not
        # less: on a loaded 2-core machine (make test) 15 s was once too short.
        out = proc.communicate(timeout=25)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
        fab.cli("down", check=False)
    assert proc.returncode == 130, out
    assert "Traceback" not in out and "stopping..." in out, out
    assert fab.cli("status", check=False).returncode == 3
    for pid in pids:
        wait_for(lambda pid=pid: not alive(pid), 10, f"pid {pid} to exit")


def test_orchestrator_restart_never_and_down_after_supervisor_died(tmp_path: Path) -> None:
    fab = Fabric(
        tmp_path,
        "name: f\nnodes:\n  a: {kind: memory, params: {size: 1M}}\n"
        "  n: {kind: null, params: {size: 1M}, restart: never}\n",
    )
    try:
        fab.up()
        nodes = fab.status()
        os.kill(nodes["n"]["pid"], signal.SIGKILL)
        wait_for(lambda: fab.status()["n"]["state"] == "failed", 30, "n to be failed")
        assert (fab.status()["n"]["pid"], fab.status()["n"]["restarts"]) == (0, 0)
        assert "n: failed (killed by SIGKILL); `nbdfabric logs n`" in fab.cli("status").stdout
        assert fab.cli("set", "a", "size", check=False).returncode == 2  # usage, as ctl set
        supervisor = int((tmp_path / "r" / "f" / "orchestrator.pid").read_text())
        os.kill(supervisor, signal.SIGKILL)
        wait_for(lambda: not alive(supervisor), 30, "the supervisor to die")
        assert alive(nodes["a"]["pid"])  # orphaned: `down` must still find it
        # ... and `status` says so, rather than a bare "not running" while `a` serves.
        res = fab.cli("status", check=False)
        assert res.returncode == 3, res
        assert "its supervisor is gone, but nodes a still run (`nbdfabric down`" in res.stderr
    finally:
        fab.cli("down")
    wait_for(lambda: not alive(nodes["a"]["pid"]), 30, "the orphan to be killed")
    assert [p for p in tmp_path.rglob("*") if p.is_socket()] == []
    # The logs stay: -n N is the last N lines (-n 0 printed all of them, -n -1 all but one).
    assert fab.cli("logs", "a", "-n", "1").stdout.startswith("--- nbdfabric: starting a")
    assert fab.cli("logs", "a", "-n", "0").stdout == ""
    assert fab.cli("logs", "a", "-n", "-1", check=False).returncode == 2


MIRROR = """\
name: f
nodes:
  m0: {kind: memory, params: {size: 16M}}
  m1: {kind: memory, params: {size: 16M}}
  mirror: {kind: mirror, upstreams: [m0, m1]}
exports:
  vm: {node: mirror, listen: ["unix:${SOCKDIR}/vm.sock"]}
"""


def ctl_members(fabric: Fabric, control: str) -> list[dict[str, Any]]:
    res = fabric.cli("ctl", control, "members", "--json")
    return list(json.loads(res.stdout)["members"])


def test_orchestrator_restarts_dead_mirror_member_and_the_mirror_rebuilds_it(
    tmp_path: Path,
) -> None:
    fab = Fabric(tmp_path, MIRROR)
    events = None
    try:
        fab.up()
        nodes = fab.status()
        assert [m["state"] for m in nodes["mirror"]["members"]] == ["in_sync", "in_sync"]
        assert nodes["m0"]["members"] == []  # only fans have members
        assert "0:in_sync 1:in_sync" in fab.cli("status").stdout  # the table's MEMBERS column
        events = subprocess.Popen(
            [sys.executable, "-m", "nodes.cli", "events", "--json"],
            cwd=fab.dir,
            env=fab.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        uri = fab.uri("vm")
        size = 16 << 20
        src = tmp_path / "model.img"
        model = bytearray(os.urandom(size))
        model[12 << 20 :] = bytes(4 << 20)  # leave a zero tail: the rebuild copies holes too
        src.write_bytes(model)
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri])

        victim = nodes["m1"]["pid"]
        os.kill(victim, signal.SIGKILL)
        # Writes while the member is dead or coming back: the mirror serves them degraded.
        h = nbd_connect(uri)
        for i in range(32):
            off = (i * 389 * 1024) % (size - 65536)
            data = os.urandom(65536)
            h.pwrite(data, off)
            model[off : off + 65536] = data
        h.flush()

        def restarted() -> bool:
            m1 = fab.status()["m1"]
            return m1["restarts"] == 1 and m1["health"] == "SERVING" and m1["pid"] != victim

        wait_for(restarted, 60, "the supervisor to restart m1")
        control = fab.status()["mirror"]["control"]

        def rebuilt() -> bool:
            members = ctl_members(fab, control)
            # m1 came back empty: in sync again only after the mirror copied data into it.
            return (
                all(m["state"] == "in_sync" for m in members)
                and members[1]["detail"]["resync_bytes"] > 0
            )

        wait_for(rebuilt, 120, "the mirror to rebuild m1 by itself")
        assert h.pread(size, 0) == model
        h.shutdown()
        src.write_bytes(model)
        sockets = [tmp_path / "r" / "f" / f"{m}.sock" for m in ("m0", "m1")]
        member_uris = [f"nbd+unix:///?socket={s}" for s in sockets]
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", member_uris[0], member_uris[1]])
        for member in member_uris:
            run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), member])
        nodes = fab.status()
        assert nodes["m0"]["restarts"] == 0 and nodes["mirror"]["restarts"] == 0
        assert [m["state"] for m in nodes["mirror"]["members"]] == ["in_sync", "in_sync"]
    finally:
        fab.cli("down")
    assert events is not None
    out, err = events.communicate(timeout=60)  # the stream ends with the supervisor
    assert events.returncode == 0, err
    seen = [json.loads(line) for line in out.splitlines()]
    kinds = [(e["node"], e["kind"]) for e in seen]
    assert ("m1", "exited") in kinds and ("m1", "restarted") in kinds
    members = [e["message"] for e in seen if e["node"] == "mirror" and e["kind"] == "members"]
    assert members and members[-1] == "0:in_sync 1:in_sync"
    res = fab.cli("events", "--no-follow", check=False)
    assert res.returncode == 3 and "not running" in res.stderr


def test_orchestrator_status_shows_a_fans_rebuild_while_it_runs(tmp_path: Path) -> None:
    """`nbdfabric status` (table and --json) carries the fan's rebuild progress: a member
    restarted empty is being rebuilt (throttled to a few seconds), and the MEMBERS column says
    so beside the states; once done, it says nothing more."""
    fab = Fabric(
        tmp_path,
        MIRROR.replace("upstreams: [m0, m1]}", "upstreams: [m0, m1], params: {rebuild-rate: 2M}}"),
    )
    try:
        fab.up()
        run(["qemu-io", "-f", "raw", fab.uri("vm"), "-c", "write -P 0x5a 0 16M"])
        victim = fab.status()["m1"]["pid"]
        os.kill(victim, signal.SIGKILL)

        def rebuilding() -> dict[str, Any] | None:
            rebuild = fab.status()["mirror"]["rebuild"]
            return rebuild if rebuild and rebuild["running"] else None

        rebuild = wait_for(rebuilding, 60, "the rebuild of m1", interval=0.3)
        assert rebuild["member_index"] == 1 and rebuild["total_bytes"] > 0
        table = fab.cli("status").stdout
        assert re.search(r"0:in_sync 1:rebuilding \(rebuild member 1: \d+%\)", table), table
        wait_for(lambda: not rebuilding() and "(rebuild" not in fab.cli("status").stdout, 60,
                 "the rebuild to end", interval=0.3)  # fmt: skip
    finally:
        fab.cli("down")


def file_fan(kind: str, names: list[str]) -> str:
    """A fan of `kind` over file nodes named `names`, exported as vm."""
    members = "".join(f'  {m}: {{kind: file, params: {{file: "${{SOCKDIR}}/{m}.img"}}}}\n'
                      for m in names)  # fmt: skip
    return (f"name: f\nnodes:\n{members}  fan: {{kind: {kind}, upstreams: [{', '.join(names)}]}}\n"
            'exports:\n  vm: {node: fan, listen: ["unix:${SOCKDIR}/vm.sock"]}\n')  # fmt: skip


def uri_fan(kind: str, uris: list[str], params: str) -> str:
    """A fan of `kind` over member nodes outside the fabric (at `uris`), exported as vm."""
    return ("name: f\nnodes:\n"
            f"  fan: {{kind: {kind}, upstreams: [{', '.join(repr(u) for u in uris)}],\n"
            f"        params: {params}}}\n"
            'exports:\n  vm: {node: fan, listen: ["unix:${SOCKDIR}/vm.sock"]}\n')  # fmt: skip


@pytest.mark.parametrize(("kind", "members"), [("mirror", 2), ("parity", 3)])
def test_orchestrator_fan_that_lost_every_member_at_once_serves_again(
    tmp_path: Path, kind: str, members: int
) -> None:
    """Every member node killed together: the fan has too few members left and fails; the
    supervisor restarts them over their files, and the fan trusts them again by itself (it
    checks them first: a member that came back empty would not be)."""
    names = [f"m{i}" for i in range(members)]
    for m in names:
        (tmp_path / f"{m}.img").write_bytes(bytes(4 << 20))
    fab = Fabric(tmp_path, file_fan(kind, names))
    try:
        fab.up()
        uri = fab.uri("vm")
        h = nbd_connect(uri)
        model = os.urandom(h.get_size())
        h.pwrite(model, 0)
        h.flush()
        nodes = fab.status()
        for m in names:
            os.kill(nodes[m]["pid"], signal.SIGKILL)
        control = nodes["fan"]["control"]

        def serving_again() -> bool:
            res = fab.cli("ctl", control, "members", "--json", check=False)
            if res.returncode != 0:  # the supervisor restarting an unhealthy fan: seen below
                return False
            return all(m["state"] == "in_sync" for m in json.loads(res.stdout)["members"])

        wait_for(lambda: all(fab.status()[m]["restarts"] == 1 for m in names), 60, "restarts")
        wait_for(serving_again, 60, f"the {kind} to serve again")
        assert h.pread(len(model), 0) == model
        h.shutdown()
        if kind == "mirror":
            for m in names:
                assert (tmp_path / f"{m}.img").read_bytes() == model
        assert fab.status()["fan"]["restarts"] == 0
        assert "has failed" not in fab.cli("status").stdout
    finally:
        fab.cli("down")


def test_orchestrator_docker_backend_without_engine_says_so(tmp_path: Path) -> None:
    fab = Fabric(tmp_path)
    fab.env["DOCKER_HOST"] = f"unix://{tmp_path}/no-docker.sock"
    res = fab.cli("up", "--detach", "--backend", "docker", str(fab.file), check=False)
    assert res.returncode == 1
    assert "nbdfabric up: docker backend: no docker engine reachable" in res.stderr
    assert not (tmp_path / "r" / "f" / "state.json").exists()
    assert fab.cli("status", check=False).returncode == 3


def test_orchestrator_leaves_a_failed_mirror_to_the_operator(
    tmp_path: Path, start_node: Any
) -> None:
    """A mirror that failed with its members reachable is not restarted after the NOT_SERVING
    grace: a new process would take every member as in sync and serve stale data. Here member
    0 left first and missed writes member 1 acknowledged; member 1 is back only later. The
    mirror keeps failing reads (never stale data), `status` says what a trust would cost, and
    the mirror serves the new data again by itself once member 1 is back."""
    size = 4 << 20
    disks = [tmp_path / "a.img", tmp_path / "b.img"]
    for disk in disks:
        disk.write_bytes(bytes(size))
    a, b = (start_node("file", str(d)) for d in disks)
    fab = Fabric(
        tmp_path,
        uri_fan("mirror", [a.uri, b.uri], "{check-interval: 0.05, retry-delay: 0.1}").replace(
            "retry-delay: 0.1}", "retry-delay: 0.1},\n        healthcheck: {grace: 2s}"
        ),
    )
    old, new = os.urandom(size), os.urandom(size)
    try:
        fab.up()
        uri = fab.uri("vm")
        h = nbd_connect(uri)
        h.pwrite(old, 0)
        h.flush()
        a.kill()
        h.pwrite(new, 0)  # acknowledged by member 1 alone
        h.flush()
        h.shutdown()
        b.kill()
        start_node("file", str(disks[0]), listen=f"unix:{a.socket}")  # the stale member
        wait_for(lambda: fab.status()["fan"]["health"] == "NOT_SERVING", 30, "the fan to fail")

        def said_failed() -> bool:
            res = fab.cli("events", "--no-follow")
            said = " fan: failed: NOT_SERVING for 2s with healthy upstreams: not restarted"
            return any(said in line for line in res.stdout.splitlines())

        wait_for(said_failed, 60, "the supervisor to give up on the fan", 0.5)
        nodes = fab.status()
        assert nodes["fan"]["restarts"] == 0 and nodes["fan"]["health"] == "NOT_SERVING"
        res = subprocess.run(["nbdcopy", uri, "-"], capture_output=True, timeout=60)
        assert res.returncode != 0 and "Input/output error" in res.stderr.decode()
        control = nodes["fan"]["control"]
        shown = fab.cli("status").stdout
        assert "member(s) 0 reachable" in shown
        assert "none of them holds every acknowledged write" in shown  # member 0 missed some
        assert f"nbdfabric ctl {control} trust 0" in shown
        # Member 1 comes back: it left last, and member 0 missed every region it could be
        # compared on, so the mirror trusts it by itself and rebuilds member 0 from it.
        start_node("file", str(disks[1]), listen=f"unix:{b.socket}")

        def in_sync() -> bool:
            return [m["state"] for m in fab.status()["fan"]["members"]] == ["in_sync"] * 2

        wait_for(in_sync, 60, "member 0 to be rebuilt from member 1")
        h = nbd_connect(uri)
        assert h.pread(size, 0) == new
        h.shutdown()
        assert disks[0].read_bytes() == disks[1].read_bytes() == new
        assert fab.status()["fan"]["restarts"] == 0
        assert "has failed" not in fab.cli("status").stdout
    finally:
        fab.cli("down")


@pytest.mark.parametrize(("kind", "members", "params"),
                         [("mirror", 2, "{}"), ("parity", 3, "{retry-delay: 60}")])  # fmt: skip
def test_orchestrator_fan_restarted_after_a_crash_remembers_its_faulty_member(
    tmp_path: Path, start_node: Any, kind: str, members: int, params: str
) -> None:
    """The supervisor gives a mirror or parity fan a state file in the run dir (bitmap-file,
    state-file), so a fan killed with -9 and restarted still knows member 0 missed writes: it
    serves the new data, not member 0's stale share of it."""
    size = 4 << 20
    nodes = [start_node("memory", "4M") for _ in range(members)]
    fab = Fabric(tmp_path, uri_fan(kind, [n.uri for n in nodes], params))
    size = size if kind == "mirror" else size * (members - 1)
    old, new = os.urandom(size), os.urandom(size)
    try:
        fab.up()
        uri = fab.uri("vm")
        h = nbd_connect(uri)
        h.pwrite(old, 0)
        h.flush()
        control = fab.status()["fan"]["control"]
        fab.cli("ctl", control, "faulty", "0")  # out until the operator rebuilds it
        h.pwrite(new, 0)
        h.flush()
        h.shutdown()
        assert (tmp_path / "r" / "f" / "fan.state").exists()
        assert fab.status()["fan"]["members"][0]["state"] == "faulty"
        os.kill(fab.status()["fan"]["pid"], signal.SIGKILL)
        wait_for(lambda: fab.status()["fan"]["restarts"] == 1, 60, "the fan to be restarted")
        wait_for(lambda: fab.status()["fan"]["health"] == "SERVING", 60, "the fan to serve")
        states = [m["state"] for m in fab.status()["fan"]["members"]]
        assert states == ["faulty"] + ["in_sync"] * (members - 1)
        h = nbd_connect(uri)
        for _ in range(4):  # every read policy's choice: only member 1 may answer
            assert h.pread(size, 0) == new
        h.shutdown()
        # `up` again with another check-interval (not live: a restart) keeps the state too.
        fab.file.write_text(fab.file.read_text().replace("params: {", "params: "
                            "{check-interval: 0.3, ").replace(", }", "}"))  # fmt: skip
        assert "fan:restart" in fab.cli("up", "--detach", str(fab.file)).stdout.replace(" ", "")
        wait_for(lambda: fab.status()["fan"]["health"] == "SERVING", 60, "the fan to serve")
        assert [m["state"] for m in fab.status()["fan"]["members"]] == states
        assert nbd_connect(uri).pread(size, 0) == new
    finally:
        fab.cli("down")
    assert not (tmp_path / "r" / "f" / "fan.state").exists()


def test_orchestrator_forgets_a_parity_fans_journal_with_its_state(tmp_path: Path) -> None:
    """A node whose members or shape changed loses its state file, and a parity fan's journal
    beside it (a journal of the old array would be refused, or replayed into the new one)."""
    from orchestrator.backends.process import ProcessBackend, RunDir

    backend = ProcessBackend(RunDir(tmp_path), control=False)
    for name in ("fan.state", "fan.state.journal", "other.state.journal"):
        (tmp_path / name).write_text("x")
    backend.forget_state("fan")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.state.journal"]
    backend.forget_state("fan")  # nothing left to forget: no error


DIRECTORY = """\
name: f
nodes:
  files: {kind: file, params: {dir: "${SOCKDIR}/disks"}}
  cow: {kind: cow, upstream: files/a.img}
  proxy: {kind: nbd, upstream: files/b.img}
exports:
  va: {node: cow, listen: ["unix:${SOCKDIR}/va.sock"]}
  vb: {node: proxy, listen: ["unix:${SOCKDIR}/vb.sock"]}
"""


def disks(tmp_path: Path) -> dict[str, bytes]:
    """`SOCKDIR/disks/` with two images of different random contents (and sizes)."""
    images = {"a.img": os.urandom(2 << 20), "b.img": os.urandom(3 << 20)}
    (tmp_path / "disks").mkdir()
    for name, data in images.items():
        (tmp_path / "disks" / name).write_bytes(data)
    return images


def test_orchestrator_filters_over_files_of_a_directory_node(tmp_path: Path) -> None:
    """`upstream: files/a.img`: each filter reads its own file of the one directory node; a
    write through the cow stays in its overlay, one through the nbd proxy reaches b.img."""
    images = disks(tmp_path)
    fab = Fabric(tmp_path, DIRECTORY)
    try:
        fab.up()
        nodes = fab.status()
        for n in nodes.values():
            assert (n["state"], n["health"], n["restarts"]) == ("running", "SERVING", 0), n
        assert nodes["cow"]["upstreams"] == ["files/a.img"]
        assert (nodes["files"]["exports"], nodes["cow"]["exports"]) == ("directory", "")
        va, vb = fab.uri("va"), fab.uri("vb")
        assert read_sha(tmp_path, va, 2 << 20) == sha(images["a.img"])
        assert read_sha(tmp_path, vb, 3 << 20) == sha(images["b.img"])
        write_read(tmp_path, va, 1 << 20)  # through the cow: back as written...
        assert (tmp_path / "disks" / "a.img").read_bytes() == images["a.img"]  # ...a.img as was
        h = nbd_connect(vb)
        h.pwrite(b"proxied!" * 512, 4096)
        h.flush()
        h.shutdown()
        b_img = tmp_path / "disks" / "b.img"
        b = b_img.read_bytes()
        assert b[4096:8192] == b"proxied!" * 512 and b[:4096] == images["b.img"][:4096]
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(b_img), vb])
        pids = set(fab.pids)
    finally:
        fab.cli("down", check=False)
    assert_all_gone(tmp_path, pids)


def test_orchestrator_exports_a_directory_node_with_every_file(tmp_path: Path) -> None:
    """A directory node in `exports:` serves each file on the export's addresses under the
    file's name; `up` and `status` print the addresses' URIs (no export name) with a note."""
    images = disks(tmp_path)
    fab = Fabric(
        tmp_path,
        'name: f\nnodes:\n  files: {kind: file, params: {dir: "${SOCKDIR}/disks"}}\n'
        'exports:\n  all: {node: files, listen: ["unix:${SOCKDIR}/all.sock", "127.0.0.1:0"]}\n',
    )
    try:
        out = fab.up()
        note = "  (directory: one export per file, nbdinfo --list)"
        assert f"  all: nbd+unix:///?socket={tmp_path}/all.sock{note}\n" in out
        files = fab.status()["files"]
        assert (files["export_name"], files["exports"]) == ("all", "directory")
        tcp = fab.uri("all", "nbd://")
        assert tcp.startswith("nbd://127.0.0.1:") and tcp.endswith("/")
        assert f"export all: {tcp}{note}" in fab.cli("status").stdout.splitlines()
        for uri in (fab.uri("all"), tcp):
            listing = json.loads(run(["nbdinfo", "--list", "--json", uri]).stdout)
            sizes = {e["export-name"]: e["export-size"] for e in listing["exports"]}
            assert sizes == {name: len(data) for name, data in images.items()}
        assert read_sha(tmp_path, tcp + "b.img", 3 << 20) == sha(images["b.img"])
        assert run(["nbdinfo", "--size", tcp], check=False).returncode != 0  # "" is refused
    finally:
        fab.cli("down", check=False)


def test_orchestrator_member_and_health_calls_on_a_channel_closed_under_them_do_not_cancel(
    tmp_path: Path,
) -> None:
    """A fan's runner closes its channel when it restarts the fan; a `Status` asking that fan
    for its members at that moment got grpc.aio's CancelledError, which killed the Status RPC
    without a reply (found by the soak: `nbdfabric status` hung until its deadline). The calls
    answer 'not answering' instead; a caller that is itself cancelled still is."""
    import asyncio

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from nodes.control.rpc.nbdfabric.v1 import node_pb2, node_pb2_grpc
    from orchestrator.supervisor import check_health, list_members

    class Slow(node_pb2_grpc.NodeServiceServicer, health_pb2_grpc.HealthServicer):
        async def ListMembers(self, request: Any, context: Any) -> Any:
            await asyncio.sleep(30)
            return node_pb2.ListMembersResponse()

        async def Check(self, request: Any, context: Any) -> Any:
            await asyncio.sleep(30)
            return health_pb2.HealthCheckResponse()

    async def main() -> None:
        server = grpc.aio.server()
        node_pb2_grpc.add_NodeServiceServicer_to_server(Slow(), server)
        health_pb2_grpc.add_HealthServicer_to_server(Slow(), server)
        address = f"unix:{tmp_path}/slow.sock"
        server.add_insecure_port(address)
        await server.start()
        try:
            channel = grpc.aio.insecure_channel(address)
            calls = [asyncio.create_task(list_members(channel)),
                     asyncio.create_task(check_health(channel))]  # fmt: skip
            await asyncio.sleep(0.3)
            await channel.close()
            assert await asyncio.gather(*calls) == [None, "UNREACHABLE"]
            channel = grpc.aio.insecure_channel(address)
            call = asyncio.create_task(list_members(channel))
            await asyncio.sleep(0.3)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await channel.close()
        finally:
            await server.stop(None)

    asyncio.run(main())
