"""The scan, exportname, blocksize-policy and retry-request filters, in real node processes
driven by real clients (libnbd, nbdinfo, nbdcopy, qemu-io), each checked against nbdkit 1.32's
filter of the same name over the same data: the same bytes, errors (errno), export lists and
names, block sizes and capabilities. Where we differ from nbdkit on purpose the test says so
(and the filter's docstring says why). A few tests hold the new handshake and session hooks
directly (Prepare events, lifted block size checks, the write-disconnect limit).
"""

from __future__ import annotations

import asyncio
import errno
import json
import re
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import nbd
import pytest
from conftest import NBDFABRIC, ROOT, Proc, nbd_connect, run, wait_for
from test_filters_more import caps, errno_of, memory_with, nbdkit_memory_with, read_all, sha

from nodes.control.rpc.nbdfabric.v1 import node_pb2 as pb
from nodes.control.rpc.nbdfabric.v1 import node_pb2_grpc as pb_grpc

KiB, MiB = 1 << 10, 1 << 20
StartNode = Callable[..., Proc]
StartNbdkit = Callable[..., Proc]


def patterned(size: int, seed: int = 7) -> bytes:
    """Data with no zero pages, different in every 4K (so a misplaced block shows)."""
    return b"".join(
        struct.pack(">QQ", seed, page).ljust(4096, bytes([1 + (page + seed) % 250]))
        for page in range(size // 4096)
    )


class Control:
    """A node's gRPC control: its status (GetInfo) and per-operation counters (GetStats)."""

    def __init__(self, node: Proc) -> None:
        assert node.control, "start the node with control=True"
        self.channel = grpc.insecure_channel(node.control)
        self.stub = pb_grpc.NodeServiceStub(self.channel)

    def status(self) -> dict[str, Any]:
        info = self.stub.GetInfo(pb.GetInfoRequest(), timeout=10)
        status: dict[str, Any] = json.loads(info.status_json or "{}")
        return status

    def ops(self, name: str) -> tuple[int, int, int]:
        """(count, bytes, errors) of one operation (read, write, cache, ...)."""
        stats = self.stub.GetStats(pb.GetStatsRequest(), timeout=10)
        op = next(o for o in stats.ops if o.op == name)
        return op.count, op.bytes, op.errors


@pytest.fixture
def control() -> Iterator[Callable[[Proc], Control]]:
    made: list[Control] = []

    def make(node: Proc) -> Control:
        made.append(Control(node))
        return made[-1]

    yield make
    for c in made:
        c.channel.close()


# scan ----------------------------------------------------------------------------------------


def scan_log(path: Path) -> list[tuple[str, int, int]]:
    """(op, offset, count) of each request our log filter wrote."""
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "request":
            out.append((rec["op"], rec["offset"], rec["count"]))
    return out


def nbdkit_caches(path: Path) -> list[tuple[str, int, int]]:
    """(op, offset, count) of each CACHE nbdkit's log filter wrote."""
    found = re.findall(r" Cache id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+) ", path.read_text())
    return [("cache", int(offset, 16), int(count, 16)) for offset, count in found]


def test_scan_caches_the_whole_disk_in_scan_size_steps_as_nbdkit(
    tmp_path: Path, start_node: StartNode, start_nbdkit: StartNbdkit
) -> None:
    """One client connects and does nothing: both scans CACHE every scan-size step of the
    disk, once, in order (ours seen by a log node below, nbdkit's by its log filter)."""
    size, step = 4 * MiB, 512 * KiB
    ours_log = tmp_path / "ours.jsonl"
    mem = start_node("memory", str(size))
    logged = start_node("log", f"logfile={ours_log}", upstreams=[mem.uri])
    ours = start_node("scan", f"scan-size={step}", upstreams=[logged.uri])
    theirs_log = tmp_path / "theirs.log"
    theirs = start_nbdkit(
        "--filter=scan", "--filter=log", "memory", str(size), f"scan-size={step}",
        f"logfile={theirs_log}",
    )  # fmt: skip
    want = [("cache", offset, step) for offset in range(0, size, step)]
    h = nbd_connect(ours.uri)
    wait_for(lambda: len(scan_log(ours_log)) >= len(want), 10, "our scan to finish")
    h2 = nbd_connect(theirs.uri)
    wait_for(lambda: len(nbdkit_caches(theirs_log)) >= len(want), 10, "nbdkit's scan")
    time.sleep(0.2)  # a pass is one pass: nothing more comes
    h.shutdown()
    h2.shutdown()
    assert sorted(scan_log(ours_log)) == nbdkit_caches(theirs_log) == want
    assert caps(ours.uri) == caps(theirs.uri)


def test_scan_warms_a_cache_node_while_the_client_reads(
    start_node: StartNode, control: Callable[[Proc], Control]
) -> None:
    """A slow disk (each CACHE/read below takes 20ms) behind a cache-on-read cache: the scan
    loads the cache block by block while the client's own reads are answered, correct, long
    before the scan is done; in the end every block is in the cache."""
    size, step = 8 * MiB, 256 * KiB
    image = patterned(size)
    mem = memory_with(start_node, image)
    slow = start_node("delay", "delay-read=20ms", "delay-cache=20ms", upstreams=[mem.uri])
    cache = start_node("cache", "cache-on-read=true", upstreams=[slow.uri], control=True)
    # scan-ahead=false: the reads below are far ahead, and would move the scan past them.
    scan = start_node(
        "scan", f"scan-size={step}", "scan-ahead=false", upstreams=[cache.uri], control=True
    )
    cache_ctl, scan_ctl = control(cache), control(scan)
    h = nbd_connect(scan.uri)
    started = time.monotonic()
    for offset in (5 * MiB, 7 * MiB + 4096, 64 * KiB):
        assert bytes(h.pread(4096, offset)) == image[offset : offset + 4096]
    served = time.monotonic() - started
    during = scan_ctl.status()["scan"]
    assert during["running"] and during["position"] < size  # still scanning
    # The reads did not wait for the scan (32 steps, two at a time, 20ms each: 320ms+).
    assert served < 0.3, served
    wait_for(lambda: not scan_ctl.status()["scan"]["running"], 20, "the scan to finish")
    assert cache_ctl.status()["cache"]["bytes"] == size
    assert read_all(scan.uri) == image
    h.shutdown()


def test_scan_reads_an_upstream_that_cannot_cache(
    start_node: StartNode, control: Callable[[Proc], Control]
) -> None:
    """nocache cachemode=none hides CACHE: the scan reads the disk instead (nbdkit's scan
    does nothing there), so the memory node below sees the whole disk read once."""
    size = 2 * MiB
    mem = start_node("memory", str(size), control=True)
    blind = start_node("nocache", "cachemode=none", upstreams=[mem.uri])
    scan = start_node("scan", "scan-size=512K", upstreams=[blind.uri], control=True)
    mem_ctl = control(mem)
    h = nbd_connect(scan.uri)
    wait_for(lambda: not control(scan).status()["scan"]["running"], 10, "the scan")
    status = control(scan).status()["scan"]
    assert (status["mode"], status["bytes"], status["passes"]) == ("read", size, 1)
    assert mem_ctl.ops("read")[:2] == (4, size)
    assert mem_ctl.ops("cache")[0] == 0
    h.shutdown()


def test_scan_stops_when_the_client_leaves_and_resumes_for_the_next(
    tmp_path: Path, start_node: StartNode, control: Callable[[Proc], Control]
) -> None:
    """scan-clock (default): the scan stops with the last client and the next one's resumes
    where it stopped; with scan-clock=false it starts again at 0. A log node below sees the
    CACHE requests (the log filter writes a request once it is answered)."""
    size, step = 8 * MiB, 256 * KiB
    mem = start_node("memory", str(size))
    slow = start_node("delay", "delay-cache=30ms", upstreams=[mem.uri])
    for clock in ("true", "false"):
        log = tmp_path / f"clock-{clock}.jsonl"
        logged = start_node("log", f"logfile={log}", upstreams=[slow.uri])
        scan = start_node(
            "scan", f"scan-size={step}", f"scan-clock={clock}", upstreams=[logged.uri],
            control=True,
        )  # fmt: skip
        ctl = control(scan)
        h = nbd_connect(scan.uri)
        wait_for(lambda: len(scan_log(log)) >= 6, 10, "the scan to start")
        h.shutdown()
        wait_for(lambda: not ctl.status()["scan"]["running"], 5, "the scan to stop")
        stopped = ctl.status()["scan"]["position"]
        seen = len(scan_log(log))
        time.sleep(0.3)  # ten steps' time: nothing more is asked
        assert len(scan_log(log)) == seen
        assert 0 < stopped < size
        h = nbd_connect(scan.uri)
        wait_for(lambda: len(scan_log(log)) > seen, 5, "the scan to resume")
        h.shutdown()
        resumed_at = min(offset for _, offset, _ in scan_log(log)[seen:])
        assert resumed_at == (stopped if clock == "true" else 0)


def test_scan_ahead_skips_what_a_client_read_passed(
    start_node: StartNode, control: Callable[[Proc], Control]
) -> None:
    size, step = 8 * MiB, 256 * KiB
    mem = start_node("memory", str(size))
    slow = start_node("delay", "delay-cache=30ms", upstreams=[mem.uri])
    for ahead in ("true", "false"):
        scan = start_node(
            "scan", f"scan-size={step}", f"scan-ahead={ahead}", upstreams=[slow.uri],
            control=True,
        )  # fmt: skip
        ctl = control(scan)
        h = nbd_connect(scan.uri)
        h.pread(4096, 6 * MiB)  # far ahead of a scan that has just begun
        wait_for(lambda: not ctl.status()["scan"]["running"], 10, "the scan")
        status = ctl.status()["scan"]
        h.shutdown()
        if ahead == "true":
            assert status["skipped_bytes"] >= 5 * MiB
            assert status["bytes"] <= 3 * MiB
        else:
            assert (status["skipped_bytes"], status["bytes"]) == (0, size)


def test_scan_forever_starts_again(start_node: StartNode, control: Callable[[Proc], Control]):
    mem = start_node("memory", "1M")
    scan = start_node("scan", "scan-size=512K", "scan-forever=true", upstreams=[mem.uri],
                      control=True)  # fmt: skip
    h = nbd_connect(scan.uri)
    wait_for(lambda: control(scan).status()["scan"]["passes"] >= 3, 10, "three passes")
    h.shutdown()
    wait_for(lambda: not control(scan).status()["scan"]["running"], 5, "the scan to stop")


def test_scan_data_and_capabilities_match_nbdkit(
    start_node: StartNode, start_nbdkit: StartNbdkit
) -> None:
    image = patterned(2 * MiB)
    ours = start_node("scan", upstreams=[memory_with(start_node, image).uri])
    theirs = start_nbdkit("--filter=scan", "memory", str(len(image)))
    h = nbd_connect(theirs.uri)
    h.pwrite(image, 0)
    h.shutdown()
    assert caps(ours.uri) == caps(theirs.uri)
    assert sha(read_all(ours.uri)) == sha(read_all(theirs.uri)) == sha(image)
    got = run(["qemu-io", "-f", "raw", "-c", f"read -P {image[4095]} 4095 1", ours.uri]).stdout
    assert "read 1/1 bytes" in got


@pytest.mark.parametrize("value", ["0", "256", "3M", "64M", "1G"])
def test_scan_size_must_be_a_power_of_two_from_512_to_32m(value: str) -> None:
    res = subprocess.run(
        [*NBDFABRIC, "node", "scan", f"scan-size={value}", "--upstream", "nbd://h/"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 1 and "scan-size" in res.stderr
