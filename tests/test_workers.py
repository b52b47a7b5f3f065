"""`nbdfabric node --workers N`: several processes serving one export, checked with real clients.

The node process supervises; its children serve. Which worker accepts a connection is the
kernel's choice, so the tests that need a given worker to serve stop the other one (SIGSTOP):
connections then go to the one left.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import nbd
import pytest
from conftest import NBDFABRIC, ROOT, alive, nbd_connect, wait_for

from bench.__main__ import children_of


def test_workers_serve_one_disk_from_every_process(start_node) -> None:
    node = start_node("memory", "8M", extra=("--workers", "2"))
    first, worker = sorted(children_of(node.pid))
    assert sorted(node.info["workers"]) == [first, worker]
    data = os.urandom(1 << 20)
    os.kill(worker, signal.SIGSTOP)  # the next connection can only be the first process's
    try:
        a = nbd_connect(node.uri)
        a.pwrite(data, 4096)
        a.trim(64 << 10, 4 << 20)
    finally:
        os.kill(worker, signal.SIGCONT)
    os.kill(first, signal.SIGSTOP)  # and this one only the worker's
    try:
        b = nbd_connect(node.uri)
        assert b.pread(len(data), 4096) == data  # written in the other process
        seen: list[tuple[int, int]] = []

        def extents(context: str, offset: int, entries: list[int], err: object) -> int:
            seen.extend(zip(entries[::2], entries[1::2], strict=True))
            return 0

        b.block_status(8 << 20, 0, extents)
        allocated = sum(length for length, flags in seen if not flags & nbd.STATE_HOLE)
        assert allocated == 33 * 32768  # the 1M + 4K written touched 33 pages of 32K
        b.pwrite(b"w" * 4096, 0)
    finally:
        os.kill(first, signal.SIGCONT)
    assert a.pread(4096, 0) == b"w" * 4096  # and back: the worker's write, seen by the first
    a.shutdown()
    b.shutdown()


@pytest.mark.parametrize("kind", ["split", "partitioning"])
def test_workers_of_a_disk_made_of_files(start_node, tmp_path: Path, kind: str) -> None:
    """split and partitioning open their files in each worker: a write through one worker
    across the files' boundary is read back through the other, and lands in both files."""
    files = [tmp_path / "a.img", tmp_path / "b.img"]
    for f in files:
        f.write_bytes(bytes(1 << 20))
    node = start_node(kind, *map(str, files), extra=("--workers", "2"))
    first, worker = sorted(children_of(node.pid))
    h = nbd_connect(node.uri)
    size = h.get_size()
    h.shutdown()
    # Where a.img ends on the disk: split puts it first; partitioning after the table
    # (its first partition starts 1M in, nbdkit's default alignment).
    end_of_a = (1 << 20) if kind == "split" else (2 << 20)
    data = os.urandom(64 << 10)
    os.kill(worker, signal.SIGSTOP)
    try:
        a = nbd_connect(node.uri)
        a.pwrite(data, end_of_a - len(data) // 2)
        a.flush()
    finally:
        os.kill(worker, signal.SIGCONT)
    os.kill(first, signal.SIGSTOP)
    try:
        b = nbd_connect(node.uri)
        assert b.get_size() == size
        assert b.pread(len(data), end_of_a - len(data) // 2) == data
        b.shutdown()
    finally:
        os.kill(first, signal.SIGCONT)
    a.shutdown()
    half = len(data) // 2
    assert files[0].read_bytes()[-half:] == data[:half]
    assert files[1].read_bytes()[:half] == data[half:]


def test_workers_take_nbdcopy_connections_and_keep_every_byte(start_node, tmp_path: Path) -> None:
    node = start_node("memory", "32M", extra=("--workers", "3"))
    assert sorted(node.info["workers"]) == sorted(children_of(node.pid))
    assert len(node.info["workers"]) == 3
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(32 << 20))
    subprocess.run(["nbdcopy", "--connections=4", str(src), node.uri], check=True)
    back = tmp_path / "back.img"
    subprocess.run(["nbdcopy", "--connections=4", node.uri, str(back)], check=True)
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), node.uri], check=True
    )


def test_workers_of_an_nbd_proxy(start_node, tmp_path: Path) -> None:
    memory = start_node("memory", "16M", extra=("--workers", "2"))
    proxy = start_node("nbd", upstreams=[memory.uri], extra=("--workers", "2"))
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(16 << 20))
    subprocess.run(["qemu-img", "convert", "-n", "-O", "raw", str(src), proxy.uri], check=True)
    subprocess.run(["nbdcopy", "--connections=4", proxy.uri, str(tmp_path / "b.img")], check=True)
    assert (tmp_path / "b.img").read_bytes() == src.read_bytes()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_stop_signal_stops_every_worker_and_removes_the_socket(start_node, sig) -> None:
    node = start_node("memory", "8M", extra=("--workers", "3"))
    workers = children_of(node.pid)
    assert len(workers) == 3
    h = nbd_connect(node.uri)
    h.pwrite(b"x" * 4096, 0)
    h.shutdown()
    assert node.stop(sig) == 0
    wait_for(lambda: not any(alive(pid) for pid in workers), 10, "the workers to exit")
    assert not os.path.exists(node.socket)


def test_a_worker_does_not_outlive_a_killed_supervisor(start_node) -> None:
    node = start_node("null", "1M", extra=("--workers", "2"))
    workers = children_of(node.pid)
    node.kill()
    wait_for(lambda: not any(alive(pid) for pid in workers), 10, "the workers to follow")


def test_a_dead_worker_is_replaced_and_the_data_is_still_there(start_node) -> None:
    node = start_node("memory", "8M", extra=("--workers", "2"))
    h = nbd_connect(node.uri)
    h.pwrite(b"kept" * 1024, 8192)
    h.shutdown()
    before = set(children_of(node.pid))
    victim = min(before)
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        now = set(children_of(node.pid))
        return len(now) == 2 and victim not in now and all(alive(p) for p in now)

    wait_for(replaced, 15, "a new worker")
    for _ in range(4):  # whichever worker takes each connection, the data is the same
        h = nbd_connect(node.uri)
        assert h.pread(4096, 8192) == b"kept" * 1024
        h.shutdown()
    assert node.proc.poll() is None


def test_workers_that_cannot_start_fail_the_node_cleanly(tmp_path: Path) -> None:
    sock = tmp_path / "s"
    out = subprocess.run(
        [*NBDFABRIC, "node", "nbd", "--upstream", "nbd+unix:///?socket=/nonexistent",
         "--upstream-timeout", "1", "--workers", "2", "--listen", f"unix:{sock}"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1
    assert "cannot connect to upstream" in out.stderr
    assert "a worker exited before it could serve" in out.stderr
    assert not sock.exists()


def test_run_captive_mode_with_workers(tmp_path: Path) -> None:
    out = subprocess.run(
        [*NBDFABRIC, "node", "memory", "4M", "--workers", "2", "--listen", f"unix:{tmp_path}/s",
         "--run", 'nbdinfo --size "$uri"'],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(4 << 20)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["cow"], "cow keeps its state in one process"),
        (["memory", "1M", "--workers", "0"], "must be 1 or more"),
    ],
)
def test_workers_refused_where_they_cannot_work(args: list[str], message: str) -> None:
    extra = [] if "--workers" in args else ["--workers", "2"]
    if args[0] == "cow":
        args = [*args, "--upstream", "nbd+unix:///?socket=/nonexistent"]
    started = time.monotonic()
    out = subprocess.run(
        [*NBDFABRIC, "node", *args, *extra, "--listen", "unix:/tmp/never.sock"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode in (1, 2) and message in out.stderr, out.stderr
    assert time.monotonic() - started < 30


def test_kinds_say_which_can_have_workers() -> None:
    def workers(kind: str) -> bool:
        out = subprocess.run(
            [*NBDFABRIC, "kinds", kind, "--json"], cwd=ROOT, capture_output=True, text=True
        )
        return bool(json.loads(out.stdout)["workers"])

    assert workers("memory") and workers("nbd") and workers("file") and workers("split")
    assert not workers("cow") and not workers("mirror")
