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
import functools
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
from conftest import (
    NBDFABRIC,
    ROOT,
    Proc,
    errno_of,
    nbd_connect,
    read_all,
    rss_kib,
    run,
    sha,
    wait_for,
)
from test_filters_more import caps, memory_with, nbdkit_memory_with

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


def refusal(kind: str, *words: str) -> str:
    """Start node `kind` with `words` over an upstream that does not exist: its stderr. It must
    exit 1, as it does for the upstream too: the message says which it refused."""
    res = subprocess.run(
        [*NBDFABRIC, "node", kind, *words, "--upstream", "nbd://h/"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 1, res.stderr
    return res.stderr


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


@pytest.mark.parametrize("clock", ["true", "false"])
def test_scan_stops_when_the_client_leaves_and_resumes_for_the_next(
    tmp_path: Path, start_node: StartNode, control: Callable[[Proc], Control], clock: str
) -> None:
    """scan-clock (default): the scan stops with the last client and the next one's resumes
    where it stopped; with scan-clock=false it starts again at 0. A log node below sees the
    CACHE requests (the log filter writes a request once it is answered)."""
    size, step = 8 * MiB, 256 * KiB
    log = tmp_path / "below.jsonl"
    mem = start_node("memory", str(size))
    slow = start_node("delay", "delay-cache=30ms", upstreams=[mem.uri])
    logged = start_node("log", f"logfile={log}", upstreams=[slow.uri])
    scan = start_node(
        "scan", f"scan-size={step}", f"scan-clock={clock}", upstreams=[logged.uri], control=True
    )
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


@pytest.mark.parametrize("ahead", ["true", "false"])
def test_scan_ahead_skips_what_a_client_read_passed(
    start_node: StartNode, control: Callable[[Proc], Control], ahead: str
) -> None:
    size, step = 8 * MiB, 256 * KiB
    mem = start_node("memory", str(size))
    slow = start_node("delay", "delay-cache=30ms", upstreams=[mem.uri])
    scan = start_node(
        "scan", f"scan-size={step}", f"scan-ahead={ahead}", upstreams=[slow.uri], control=True
    )
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
    assert "scan-size" in refusal("scan", f"scan-size={value}")


# exportname ----------------------------------------------------------------------------------


def probe(uri: str, names: list[str]) -> dict[str, Any]:
    """What a client learns without transmission: NBD_OPT_LIST (sorted, or the errno of its
    refusal) and, for each name, NBD_OPT_INFO's canonical name, size and description (or the
    errno of the refusal)."""
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.set_full_info(True)
    h.connect_uri(uri)
    out: dict[str, Any] = {}
    listed: list[tuple[str, str]] = []
    try:
        h.opt_list(lambda name, description: listed.append((name, description)) or 0)
        out["list"] = sorted(listed)
    except nbd.Error as exc:
        out["list"] = errno.errorcode.get(exc.errnum or 0)
    for name in names:
        h.set_export_name(name)
        try:
            h.opt_info()
        except nbd.Error as exc:
            out[name] = errno.errorcode.get(exc.errnum or 0)
            continue
        try:
            description = h.get_export_description()
        except nbd.Error:
            description = None
        out[name] = (h.get_canonical_export_name(), h.get_size(), description)
    h.opt_abort()
    return out


@pytest.fixture
def disks(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A directory of three files (one with a space in its name) and a subdirectory."""
    folder = tmp_path / "disks"
    folder.mkdir()
    (folder / "sub").mkdir()
    files = {"a": patterned(MiB, 1), "b": patterned(2 * MiB, 2), "c d": patterned(512 * KiB, 3)}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder, files


NAMES = ["", "a", "b", "c d", "zz", "sub"]

#: Param sets run on both servers, over a directory of files.
EXPORTNAME_CASES: list[list[str]] = [
    [],
    ["default-export=b"],
    ["exportname-list=empty"],
    ["exportname-list=defaultonly"],
    ["exportname-list=default-only", "default-export=b"],
    ["exportname-list=explicit", "exportname=a", "exportname=zz"],
    ["exportname-strict=true", "exportname=a", "exportname=c d"],
    ["exportname-strict=true", "exportname=", "exportname=b", "default-export=b"],
    ["exportname-strict=true", "exportname=", "default-export=b"],  # b is not let through
    ["exportname-list=explicit", "exportname-strict=true", "exportname=a", "exportdesc=none"],
    ["exportdesc=fixed:a disk"],
    ["exportdesc=script:echo \"<$name>\"; echo more", "exportname-list=explicit",
     "exportname=b", "exportname=c d"],
]  # fmt: skip


@pytest.mark.parametrize("params", EXPORTNAME_CASES, ids=" ".join)
def test_exportname_lists_and_names_match_nbdkit_over_a_directory(
    start_node: StartNode,
    start_nbdkit: StartNbdkit,
    disks: tuple[Path, dict[str, bytes]],
    params: list[str],
) -> None:
    folder, _ = disks
    files = start_node("file", f"dir={folder}")
    ours = start_node("exportname", *params, upstreams=[files.uri])
    theirs = start_nbdkit("--filter=exportname", "file", f"dir={folder}", *params)
    assert probe(ours.uri, NAMES) == probe(theirs.uri, NAMES)


def list_reply(sock_path: str) -> tuple[int, bytes]:
    """The reply type and data a server gives NBD_OPT_LIST, over a raw socket."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(sock_path)
        reader = s.makefile("rb")
        reader.read(18)  # greeting: magic, IHAVEOPT, handshake flags
        s.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
        s.sendall(struct.pack(">QII", 0x49484156454F5054, 3, 0))  # NBD_OPT_LIST
        _, _, rep, length = struct.unpack(">QIII", reader.read(20))
        data = reader.read(length)
        s.sendall(struct.pack(">QII", 0x49484156454F5054, 2, 0))  # NBD_OPT_ABORT
        return rep, data


def test_exportname_list_error_is_refused_as_the_spec_says(
    start_node: StartNode, start_nbdkit: StartNbdkit
) -> None:
    """exportname-list=error: we answer NBD_REP_ERR_POLICY, the spec's error for a list the
    server will not give; nbdkit answers NBD_REP_ERR_PLATFORM ("not currently used"). libnbd
    reports ENOTSUP for both; every name still works as in nbdkit."""
    mem = start_node("memory", "1M")
    ours = start_node("exportname", "exportname-list=error", upstreams=[mem.uri])
    theirs = start_nbdkit("--filter=exportname", "memory", "1M", "exportname-list=error")
    assert probe(ours.uri, ["", "x"]) == probe(theirs.uri, ["", "x"])
    assert probe(ours.uri, [])["list"] == "ENOTSUP"
    rep, message = list_reply(ours.socket)
    assert (rep, message) == (0x80000002, b"export list restricted by policy")
    assert list_reply(theirs.socket)[0] == 0x80000004
    res = run(["nbdinfo", "--list", ours.uri], check=False)
    assert res.returncode != 0 and "list request" in res.stderr


@pytest.mark.parametrize(
    "params",
    [[], ["default-export=zz"], ["exportname-list=defaultonly", "default-export=zz"],
     ["exportname-list=defaultonly"], ["exportname-strict=true", "exportname=foo"]],
    ids=" ".join,
)  # fmt: skip
def test_exportname_over_a_single_export_matches_nbdkit(
    start_node: StartNode, start_nbdkit: StartNbdkit, params: list[str]
) -> None:
    """Over memory, which serves its one disk under any name: the name a client gives (or
    default-export) goes to it and comes back as the canonical name."""
    ours = start_node("exportname", *params, upstreams=[start_node("memory", "1M").uri])
    theirs = start_nbdkit("--filter=exportname", "memory", "1M", *params)
    names = ["", "foo", "zz"]
    assert probe(ours.uri, names) == probe(theirs.uri, names)


def test_exportname_script_under_control_logs_nothing_about_fork(start_node: StartNode) -> None:
    """exportdesc=script: in a node with --control: each description's script starts without
    fork(), so gRPC logs no `skipping fork() handlers` line for it (nodes/spawn.py); the
    script still reads $name and its output is the description."""
    mem = start_node("memory", "1M")
    ours = start_node("exportname", "exportname-list=explicit", "exportname=a", "exportname=b",
                      'exportdesc=script:echo "<$name>"', upstreams=[mem.uri],
                      control=True)  # fmt: skip
    listed = json.loads(run(["nbdinfo", "--list", "--json", ours.uri]).stdout)["exports"]
    assert {e["export-name"]: e.get("description") for e in listed} == {"a": "<a>", "b": "<b>"}
    assert "fork" not in ours.stderr() and "gRPC" not in ours.stderr(), ours.stderr()
    # Its control lists the same exports (GetInfo), and says it serves several.
    info = Control(ours).stub.GetInfo(pb.GetInfoRequest(), timeout=10)
    assert info.serves_several
    assert [(e.name, e.description) for e in info.exports] == [("a", "<a>"), ("b", "<b>")]


def test_exportname_keeps_the_upstream_descriptions(start_node: StartNode) -> None:
    mem = start_node("memory", "1M", extra=("--description", "the disk"))
    keep = start_node("exportname", upstreams=[mem.uri])
    fixed = start_node("exportname", "exportdesc=fixed:mine", upstreams=[mem.uri])
    none = start_node("exportname", "exportdesc=none", upstreams=[mem.uri])
    assert probe(keep.uri, [""]) == {"list": [("", "the disk")], "": ("", MiB, "the disk")}
    assert probe(fixed.uri, [""]) == {"list": [("", "mine")], "": ("", MiB, "mine")}
    assert probe(none.uri, [""]) == {"list": [("", "")], "": ("", MiB, None)}


def test_exportname_serves_each_file_of_a_directory(
    start_node: StartNode, disks: tuple[Path, dict[str, bytes]]
) -> None:
    """Every export a client names is the file of that name, read with nbdcopy, qemu-io and
    libnbd, written through; "" is default-export's file."""
    folder, files = disks
    node = start_node(
        "exportname", "default-export=c d", upstreams=[start_node("file", f"dir={folder}").uri]
    )
    for name, data in files.items():
        uri = node.uri.replace("/?", f"/{name.replace(' ', '%20')}?")
        copied = subprocess.run(["nbdcopy", uri, "-"], capture_output=True, check=True)
        assert sha(copied.stdout) == sha(data)
    assert read_all(node.uri) == files["c d"]  # the default export
    listed = json.loads(run(["nbdinfo", "--list", "--json", node.uri]).stdout)["exports"]
    assert {(e["export-name"], e["export-size"]) for e in listed} == {
        (n, len(d)) for n, d in files.items()
    }
    h = nbd_connect(node.uri.replace("/?", "/a?"))
    h.pwrite(b"written through", 4096)
    h.flush()
    h.shutdown()
    assert (folder / "a").read_bytes()[4096:4111] == b"written through"
    b_uri = node.uri.replace("/?", "/b?")
    fill = files["b"][MiB + 512]  # past the page's header: its fill byte
    read = f"read -P {fill} {MiB + 512} 512"
    assert "read 512/512" in run(["qemu-io", "-f", "raw", "-c", read, b_uri]).stdout


def test_exportname_refuses_an_export_name_of_its_own(
    tmp_path: Path, start_node: StartNode
) -> None:
    mem = start_node("memory", "1M")
    res = subprocess.run(
        [*NBDFABRIC, "node", "exportname", "--upstream", mem.uri, "--export-name", "x",
         "--listen", f"unix:{tmp_path}/x.sock"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 1 and "several exports" in res.stderr


def test_exportname_bad_params_exit_1_naming_them(tmp_path: Path) -> None:
    for word, key in (
        ("exportname-list=all", "exportname-list"),
        ("exportdesc=fixed", "exportdesc"),
        ("exportname-strict=maybe", "exportname-strict"),
    ):
        stderr = refusal("exportname", word)
        assert key in stderr, stderr


def test_exportname_reopens_an_export_closed_while_its_client_was_connecting(
    monkeypatch: pytest.MonkeyPatch, start_node: StartNode, disks: tuple[Path, dict[str, bytes]]
) -> None:
    """Exports no client uses are closed beyond MAX_IDLE; one looked up by a client that has
    not yet started (its handshake replies were on their way) is opened again for it, and if
    another client had it opened again meanwhile, both copies serve until their last user."""
    from nodes.filters import exportname
    from nodes.params import parse_params
    from nodes.upstream import Upstream

    monkeypatch.setattr(exportname, "MAX_IDLE", 1)
    folder, files = disks
    dir_node = start_node("file", f"dir={folder}")

    async def scenario() -> None:
        params = parse_params("exportname", exportname.ExportnameParams, [])
        node = exportname.ExportName(params, Upstream(dir_node.uri))  # type: ignore[arg-type]
        await node.start()
        await node.prepare_export("a")
        early = node.for_export("a")
        assert isinstance(early, exportname._Export)
        await node.prepare_export("b")
        await node.prepare_export("c d")  # two idle beyond the one kept: a and b closed
        assert early.closed and list(node.open) == ["c d"]
        await early.open_connection()  # the client that looked a up starts: a is back
        assert not early.closed and node.for_export("a") is early
        buf = bytearray(4096)
        await early.pread(memoryview(buf), 8192, 0)
        assert bytes(buf) == files["a"][8192 : 8192 + 4096]
        assert node.status()["exportname"]["open"]["a"] == {"connections": 1}
        await early.close_connection()
        # Closed before its client started, and opened again for another client meanwhile.
        await node.prepare_export("b")
        stale = node.for_export("b")
        assert isinstance(stale, exportname._Export)
        await node.prepare_export("a")
        await node.prepare_export("c d")
        assert stale.closed
        await node.prepare_export("b")
        fresh = node.for_export("b")
        assert fresh is not stale and fresh is not None
        await stale.open_connection()
        assert stale.orphan and node.for_export("b") is fresh
        await stale.pread(memoryview(buf), 0, 0)
        assert bytes(buf) == files["b"][:4096]
        await stale.close_connection()  # its last user: the orphan closes
        assert stale.closed and not fresh.closed
        await node.stop()
        assert fresh.closed and not node.open

    asyncio.run(scenario())


def test_exportname_switching_exports_leaves_no_memory_behind_in_the_upstream(
    start_node: StartNode, tmp_path: Path
) -> None:
    """More exports than exportname keeps open idle (16), asked for in turn: each is closed and
    opened again, and with it its pool of upstream connections, sessions of the file node that
    lived long. A session that ends lets go of its memory at once: it used to wait, 256 KiB read
    buffer and all, for a full collection of the cyclic GC (a fuzz run saw the file node grow
    by 240 MB)."""
    folder = tmp_path / "many"
    folder.mkdir()
    names = [f"n{i:02}" for i in range(20)]
    for i, name in enumerate(names):
        (folder / name).write_bytes(patterned(64 * KiB, i))
    files = start_node("file", f"dir={folder}")
    node = start_node("exportname", upstreams=[files.uri])

    def ask_each_in_turn() -> None:
        for i, name in enumerate(names):
            h = nbd_connect(node.uri.replace("/?", f"/{name}?"))
            assert h.pread(4096, 4096) == patterned(64 * KiB, i)[4096:8192]
            h.shutdown()

    ask_each_in_turn()  # every export opened once, and 16 of them (64 sessions) kept open
    before = rss_kib(files.pid)
    for _ in range(15):
        ask_each_in_turn()
    grown = rss_kib(files.pid) - before
    assert grown < 32 * 1024, f"the file node grew by {grown} KiB"


def test_exportname_opens_one_connection_for_clients_asking_at_once(
    start_node: StartNode, control: Callable[[Proc], Control], disks: tuple[Path, dict[str, bytes]]
) -> None:
    folder, files = disks
    node = start_node(
        "exportname", upstreams=[start_node("file", f"dir={folder}").uri], control=True
    )
    uri = node.uri.replace("/?", "/b?")
    results: list[bytes] = []

    def client() -> None:
        results.append(read_all(uri))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [files["b"]] * 6
    status = control(node).status()
    assert status["exportname"]["opened"] == 1
    assert [u["uri"].split("?")[0] for u in status["upstreams"]] == ["nbd+unix:///b"]


def test_exportname_a_client_asking_as_the_open_completes_shares_it(
    monkeypatch: pytest.MonkeyPatch, start_node: StartNode, disks: tuple[Path, dict[str, bytes]]
) -> None:
    """The race CI caught (opened == 2 above, once in many runs): a client whose lookup runs in
    the loop turn after the upstream connection is made, before the first client's wait on it
    resumes, must find the export being opened, not open another. Its step is queued as the
    connection completes (a task that yields once), as a session's is when its option arrives
    in that same turn."""
    from nodes.filters import exportname
    from nodes.params import parse_params
    from nodes.upstream import Upstream

    folder, files = disks
    dir_node = start_node("file", f"dir={folder}")
    late: list[asyncio.Task[None]] = []
    connect_once = Upstream.connect_once

    async def connect_then_another_asks(self: Upstream) -> None:
        await connect_once(self)
        if not late:

            async def ask() -> None:
                await asyncio.sleep(0)
                await node.prepare_export("b")

            late.append(asyncio.ensure_future(ask()))

    monkeypatch.setattr(Upstream, "connect_once", connect_then_another_asks)
    params = parse_params("exportname", exportname.ExportnameParams, [])
    node = exportname.ExportName(params, Upstream(dir_node.uri))  # type: ignore[arg-type]

    async def scenario() -> None:
        await node.start()
        await node.prepare_export("b")
        await late[0]
        assert node.opened == 1 and list(node.open) == ["b"]
        export = node.for_export("b")
        assert isinstance(export, exportname._Export)
        await export.open_connection()
        buf = bytearray(4096)
        await export.pread(memoryview(buf), 0, 0)
        assert bytes(buf) == files["b"][:4096]
        await export.close_connection()
        await node.stop()

    asyncio.run(scenario())


def test_handshake_announces_each_lookup_and_listing_with_prepare() -> None:
    """With policy.prepare, an option that looks an export up (INFO, GO, EXPORT_NAME, the meta
    context ones) or lists them stops at a Prepare event; the server gets ready, and the next
    next_event() answers it. The lookups here work only for the name prepared last."""
    from test_protocol_core import EXPORT, Client, info_data, meta_data, opt

    from nodes.protocol.constants import Opt, Rep
    from nodes.protocol.handshake import NEED_DATA, HandshakePolicy, ListRefused, Prepare, Ready

    prepared: list[str | None] = []

    def lookup(name: str) -> Any:
        return EXPORT if prepared and prepared[-1] == name and name in ("", "disk") else None

    def listing() -> list[Any]:
        if prepared[-1:] != [None]:
            raise ListRefused("listed without being prepared")
        return [EXPORT]

    c = Client(HandshakePolicy(lookup=lookup, listing=listing, prepare=True))

    def answer(frame: bytes, name: str | None) -> tuple[Any, list[Any]]:
        event, replies = c.send(frame)
        assert event == Prepare(name) and replies == []
        prepared.append(name)
        return c.send(b"")

    event, replies = answer(opt(Opt.LIST), None)
    assert event is NEED_DATA and [r.rep for r in replies] == [Rep.SERVER, Rep.ACK]
    event, replies = answer(opt(Opt.INFO, info_data("disk")), "disk")
    assert event is NEED_DATA and replies[-1].rep == Rep.ACK
    assert c.send(opt(Opt.STRUCTURED_REPLY))[1][0].rep == Rep.ACK  # no lookup: no Prepare
    event, replies = answer(opt(Opt.SET_META_CONTEXT, meta_data("disk", ["base:allocation"])),
                            "disk")  # fmt: skip
    assert [r.rep for r in replies] == [Rep.META_CONTEXT, Rep.ACK]
    event, replies = answer(opt(Opt.INFO, info_data("nope")), "nope")
    assert replies[-1].rep == Rep.ERR_UNKNOWN
    prepared.append("elsewhere")
    event, replies = answer(opt(Opt.GO, info_data("disk")), "disk")  # prepared anew
    assert isinstance(event, Ready) and event.meta_contexts

    c = Client(HandshakePolicy(lookup=lookup, listing=listing, prepare=True))
    event, _ = c.send(opt(Opt.LIST))
    prepared.append("disk")  # what was prepared is not the list
    event, replies = c.send(b"")
    assert replies[0].rep == Rep.ERR_POLICY and b"without being prepared" in replies[0].data
    event, _ = c.send(opt(Opt.EXPORT_NAME, b""))
    assert event == Prepare("")
    prepared.append("")
    event, _ = c.send(b"")
    assert isinstance(event, Ready) and event.export is EXPORT


def test_topology_names_an_exportname_node_bare_or_by_export() -> None:
    from orchestrator.topology import load_text

    top = load_text(
        """
nodes:
  files: {kind: file, params: {dir: /srv/disks}}
  names: {kind: exportname, upstream: files/a.img, params: {default-export: b.img}}
  whole: {kind: scan, upstream: names}
  one: {kind: readahead, upstream: names/c.img}
exports:
  all: {node: names, listen: ["unix:/run/n.sock"]}
""",
        "f.yaml",
    )
    assert top.nodes["names"].multi_export == "names"
    assert top.exports["all"].served_name == ""
    assert top.nodes["whole"].upstreams == ("names",)
    assert top.nodes["one"].upstreams == ("names/c.img",)
    # A CDI-style import of the export copies its default export (b.img), as qemu-img reads it.
    from orchestrator import k8s

    job = k8s.import_job(top, "all", "pvc")
    (importer,) = job["spec"]["template"]["spec"]["containers"]
    assert "nbd+unix:///?socket=/run/nbdfabric/names.sock" in importer["args"]


# blocksize-policy ----------------------------------------------------------------------------


def read_in(uri: str, piece: int) -> bytes:
    """The whole export, read `piece` bytes at a time."""
    h = nbd_connect(uri)
    size = h.get_size()
    data = b"".join(bytes(h.pread(piece, offset)) for offset in range(0, size, piece))
    h.shutdown()
    return data


def block_sizes(uri: str) -> tuple[int, int, int] | None:
    info = json.loads(run(["nbdinfo", "--json", uri]).stdout)["exports"][0]
    if "block_size_minimum" not in info:
        return None
    return info["block_size_minimum"], info["block_size_preferred"], info["block_size_maximum"]


#: Param sets, and the sizes both servers advertise over an upstream that advertises none.
BLOCKSIZE_CASES: list[tuple[list[str], tuple[int, int, int]]] = [
    (["blocksize-preferred=64K"], (1, 64 * KiB, 0xFFFFFFFF)),
    (["blocksize-minimum=4K"], (4 * KiB, 4 * KiB, 0xFFFFFFFF)),
    (["blocksize-minimum=512", "blocksize-maximum=1M"], (512, 4 * KiB, MiB)),
    (["blocksize-minimum=4K", "blocksize-preferred=16K", "blocksize-maximum=64K"],
     (4 * KiB, 16 * KiB, 64 * KiB)),
    (["blocksize-maximum=4294967295"], (1, 4 * KiB, 0xFFFFFFFF)),
]  # fmt: skip


@pytest.mark.parametrize(("params", "want"), BLOCKSIZE_CASES, ids=lambda v: str(v))
def test_blocksize_policy_advertises_what_nbdkit_does(
    start_nbdkit: StartNbdkit, start_node: StartNode, params: list[str], want: Any
) -> None:
    """Over an upstream that advertises no block sizes (nbdkit's memory, our upstream too),
    and over one that does (our memory node: 1, 4K, 32M; nbdkit reaches it with its nbd
    plugin): the same sizes from both, but for one difference: where nbdkit advertises a
    maximum of 4G-1 it still refuses requests over 64M; we advertise the 64M we take.
    (start_nbdkit comes first: our nodes, its clients, are stopped before it, which waits
    for its clients to leave.)"""

    def taken(sizes: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        return sizes and (sizes[0], sizes[1], min(sizes[2], 64 * MiB))

    bare = start_nbdkit("memory", "1M")
    ours = start_node("blocksize-policy", *params, upstreams=[bare.uri])
    theirs = start_nbdkit("--filter=blocksize-policy", "memory", "1M", *params)
    assert block_sizes(theirs.uri) == want
    assert block_sizes(ours.uri) == taken(want)
    mem = start_node("memory", "1M")
    ours = start_node("blocksize-policy", *params, upstreams=[mem.uri])
    theirs = start_nbdkit("--filter=blocksize-policy", "nbd", f"socket={mem.socket}", *params)
    assert block_sizes(ours.uri) == taken(block_sizes(theirs.uri))
    assert caps(ours.uri) == caps(theirs.uri)


#: (what, call on a libnbd handle with strict mode off): requests around minimum 4K and
#: maximum 64K, over a 1M disk.
POLICY_REQUESTS: list[tuple[str, Callable[[Any], object]]] = [
    ("read aligned", lambda h: h.pread(4096, 0)),
    ("read short", lambda h: h.pread(512, 0)),
    ("read unaligned offset", lambda h: h.pread(4096, 1)),
    ("read at the maximum", lambda h: h.pread(64 * KiB, 0)),
    ("read over the maximum", lambda h: h.pread(128 * KiB, 0)),
    ("write aligned", lambda h: h.pwrite(b"w" * 8192, 4096)),
    ("write short", lambda h: h.pwrite(b"w" * 100, 4096)),
    ("write unaligned", lambda h: h.pwrite(b"w" * 4096, 100)),
    ("write over the maximum", lambda h: h.pwrite(b"w" * 128 * KiB, 0)),
    ("zero aligned, over the maximum", lambda h: h.zero(128 * KiB, 0)),
    ("zero short", lambda h: h.zero(1, 0)),
    ("trim unaligned", lambda h: h.trim(4096, 2048)),
    ("trim aligned", lambda h: h.trim(8192, 8192)),
    ("cache short", lambda h: h.cache(1, 0)),
    ("cache aligned, over the maximum", lambda h: h.cache(128 * KiB, 0)),
    ("block status short", lambda h: h.block_status(100, 0, lambda *a: 0)),
    ("block status aligned", lambda h: h.block_status(8192, 0, lambda *a: 0)),
    ("flush", lambda h: h.flush()),
    ("read of nothing", lambda h: h.pread(0, 4096)),
    ("trim of nothing", lambda h: h.trim(0, 4096)),
]


@pytest.mark.parametrize("policy", ["allow", "error"])
def test_blocksize_policy_requests_get_the_errors_nbdkit_gives(
    start_node: StartNode, start_nbdkit: StartNbdkit, policy: str
) -> None:
    """error: whatever breaks the constraints fails with EINVAL before the upstream sees it;
    allow: everything reaches the upstream (memory, which takes any request), as in nbdkit."""
    params = ["blocksize-minimum=4K", "blocksize-maximum=64K", f"blocksize-error-policy={policy}"]
    image = patterned(MiB)
    ours = start_node("blocksize-policy", *params, upstreams=[memory_with(start_node, image).uri])
    below = nbdkit_memory_with(start_nbdkit, image)
    theirs = start_nbdkit("--filter=blocksize-policy", "nbd", f"socket={below.socket}", *params)
    seen: dict[str, list[str | None]] = {}
    for uri in (ours.uri, theirs.uri):
        h = nbd_connect(uri, strict=False)  # what breaks the constraints reaches the server
        for what, call in POLICY_REQUESTS:
            seen.setdefault(what, []).append(errno_of(call, h))
        h.shutdown()
    # Not the filter's doing: our server takes requests of no length as no-ops (qemu-nbd
    # does too); nbdkit's refuses them, with or without this filter.
    for nothing in ("read of nothing", "trim of nothing"):
        assert seen.pop(nothing) == [None, "EINVAL"]
    differ = {what: got for what, got in seen.items() if got[0] != got[1]}
    assert not differ, differ
    refused = {what for what, got in seen.items() if got[0]}
    if policy == "error":
        assert refused == {
            "read short", "read unaligned offset", "read over the maximum", "write short",
            "write unaligned", "write over the maximum", "zero short", "trim unaligned",
            "cache short", "block status short",
        }  # fmt: skip
        assert {got[0] for what, got in seen.items() if got[0]} == {"EINVAL"}
    else:
        assert refused == set()
    assert read_in(ours.uri, 64 * KiB) == read_in(theirs.uri, 64 * KiB)


def test_blocksize_policy_allow_lets_a_blocksize_node_align_what_clients_send(
    start_node: StartNode, control: Callable[[Proc], Control]
) -> None:
    """nbdkit's example: advertise 64K blocks, let misbehaving clients through to a blocksize
    node that read-modify-writes them into 64K blocks: the disk only ever sees 64K blocks."""
    image = patterned(MiB)
    mem = memory_with(start_node, image)
    logged_path = Path(mem.socket).with_suffix(".jsonl")
    logged = start_node("log", f"logfile={logged_path}", upstreams=[mem.uri])
    aligner = start_node("blocksize", "minblock=64K", upstreams=[logged.uri])
    node = start_node(
        "blocksize-policy", "blocksize-minimum=64K", "blocksize-error-policy=allow",
        upstreams=[aligner.uri],
    )  # fmt: skip
    assert block_sizes(node.uri) == (64 * KiB, 64 * KiB, 64 * MiB)  # blocksize's maximum
    h = nbd_connect(node.uri, strict=False)
    h.pwrite(b"unaligned write", 70000)
    assert (
        bytes(h.pread(100, 69990)) == image[69990:70000] + b"unaligned write" + image[70015:70090]
    )
    h.shutdown()
    for _, offset, count in scan_log(logged_path):
        assert offset % (64 * KiB) == 0 and count % (64 * KiB) == 0
    want = bytearray(image)
    want[70000:70015] = b"unaligned write"
    assert read_all(mem.uri) == bytes(want)


def write_header(length: int, offset: int = 0) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, offset, length)  # NBD_CMD_WRITE


def handshake_raw(sock_path: str) -> socket.socket:
    """A raw client through NBD_OPT_EXPORT_NAME "" (no structured replies), ready to send."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(sock_path)
    reader = s.makefile("rb")
    reader.read(18)
    s.sendall(struct.pack(">I", 3))
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 1, 0))  # NBD_OPT_EXPORT_NAME ""
    reader.read(10)  # size and flags; no zeroes
    return s


def test_blocksize_policy_write_disconnect_drops_the_client_before_the_payload(
    start_node: StartNode,
) -> None:
    """blocksize-write-disconnect=64K: a write of 64K is done; one of 1M ends the connection
    as soon as its header arrives (the payload is never sent here, and not waited for)."""
    mem = start_node("memory", "4M")
    node = start_node("blocksize-policy", "blocksize-write-disconnect=64K", upstreams=[mem.uri])
    assert block_sizes(node.uri) == (1, 4 * KiB, 32 * MiB)  # the upstream's: it says some
    h = nbd_connect(node.uri)
    h.pwrite(b"x" * 64 * KiB, 0)
    with pytest.raises(nbd.Error):
        h.pwrite(b"y" * (64 * KiB + 1), 0)
    with pytest.raises(nbd.Error):
        h.pread(512, 0)  # that connection is gone
    assert read_all(node.uri)[: 64 * KiB + 1] == b"x" * 64 * KiB + b"\0"
    s = handshake_raw(node.socket)
    started = time.monotonic()
    s.sendall(write_header(MiB))
    assert s.recv(16) == b""  # closed, with no reply and no payload read
    assert time.monotonic() - started < 5
    s.close()
    plain = start_node("blocksize-policy", upstreams=[mem.uri])
    s = handshake_raw(plain.socket)
    s.sendall(write_header(MiB))
    s.settimeout(0.5)
    with pytest.raises(TimeoutError):  # without it: the server waits for the payload
        s.recv(16)
    s.close()


def test_blocksize_policy_over_an_upstream_saying_nothing_derives_the_maximum(
    start_nbdkit: StartNbdkit, start_node: StartNode
) -> None:
    """With the upstream saying nothing and no maximum given, blocksize-write-disconnect
    (rounded down to the minimum) is the maximum advertised, as nbdkit 1.34 does."""
    bare = start_nbdkit("memory", "1M")
    node = start_node(
        "blocksize-policy", "blocksize-minimum=4K", "blocksize-write-disconnect=100000",
        upstreams=[bare.uri],
    )  # fmt: skip
    assert block_sizes(node.uri) == (4 * KiB, 4 * KiB, 98304)


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["blocksize-minimum=3K"], "power of two"),
        (["blocksize-minimum=128K"], "power of two up to 64K"),
        (["blocksize-preferred=256"], "512 to 32M"),
        (["blocksize-minimum=4K", "blocksize-maximum=6K"], "multiple of blocksize-minimum"),
        (["blocksize-minimum=8K", "blocksize-preferred=4K"], "minimum must be <="),
        (["blocksize-preferred=64K", "blocksize-maximum=32K"], "preferred must be <="),
        (["blocksize-minimum=4K", "blocksize-write-disconnect=4K"], "larger than"),
        (["blocksize-maximum=4G"], "at most 4G-1"),
        (["blocksize-error-policy=strict"], "blocksize-error-policy"),
    ],
)
def test_blocksize_policy_bad_params_exit_1(words: list[str], message: str) -> None:
    """nbdkit 1.32 starts with a maximum that is no multiple of the minimum (its check
    compares the maximum with itself) and then advertises nothing: we refuse it."""
    stderr = refusal("blocksize-policy", *words)
    assert message in stderr, stderr


def test_transmission_lifted_block_checks_still_cap_reads_and_writes() -> None:
    from nodes.protocol.constants import Cmd, TFlag
    from nodes.protocol.transmission import MAX_DATA, Err, Request, Transmission, validate

    def verdict(t: Transmission, cmd: Cmd, offset: int, length: int) -> Err:
        return validate(Request(0, int(cmd), 1, offset, length), t)

    common = dict(size=1 << 40, tflags=TFlag.HAS_FLAGS, structured=True, meta_contexts=())
    strict = Transmission(**common, block_min=4096, block_max=0xFFFFFFFF)  # type: ignore[arg-type]
    lifted = Transmission(**common, block_min=4096, block_max=64 * KiB,  # type: ignore[arg-type]
                          enforce_block_size=False)  # fmt: skip
    assert verdict(strict, Cmd.READ, 1, 4096) is Err.EINVAL
    assert verdict(lifted, Cmd.READ, 1, 4096) is Err.OK
    assert verdict(lifted, Cmd.WRITE, 0, 128 * KiB) is Err.OK  # over the advertised 64K
    for t in (strict, lifted):  # an advertised 4G-1 is no licence for a 4G buffer
        assert verdict(t, Cmd.READ, 0, MAX_DATA) is Err.OK
        assert verdict(t, Cmd.READ, 0, MAX_DATA + 4096) is Err.EINVAL


# retry-request -------------------------------------------------------------------------------


class Background:
    """A call running in a thread: its result or its nbd.Error's errno, once joined."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, args=(call,))
        self.thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self.result = call()
        except nbd.Error as exc:
            self.error = errno.errorcode.get(exc.errnum or 0, str(exc))

    def join(self, timeout: float = 30) -> Background:
        self.thread.join(timeout)
        assert not self.thread.is_alive()
        return self


def test_retry_request_hides_an_upstream_that_fails_twice_then_works(
    tmp_path: Path, start_node: StartNode, control: Callable[[Proc], Control]
) -> None:
    """Reads fail while a trigger file exists; it goes after the second failure: the client's
    read succeeds, the same request sent three times on the one upstream connection."""
    image = patterned(MiB)
    trigger = tmp_path / "failing"
    trigger.touch()
    err = start_node(
        "error", "error-rate=100%", f"error-file={trigger}", control=True,
        upstreams=[memory_with(start_node, image).uri],
    )  # fmt: skip
    node = start_node(
        "retry-request", "retry-request-retries=5", "retry-request-delay=300ms",
        upstreams=[err.uri], control=True,
    )  # fmt: skip
    err_ctl, node_ctl = control(err), control(node)
    h = nbd_connect(node.uri)
    read = Background(lambda: bytes(h.pread(4096, 8192)))
    wait_for(lambda: err_ctl.status()["injected"]["pread"] >= 2, 10, "two failures")
    trigger.unlink()
    assert read.join().error is None and read.result == image[8192 : 8192 + 4096]
    failures = err_ctl.status()["injected"]["pread"]
    assert failures in (2, 3)  # the third try may come before the file is gone
    status = node_ctl.status()
    assert (status["retried"], status["gave_up"]) == (failures, 0)
    assert status["upstreams"][0]["reconnects"] == 0  # nothing was reopened
    h.shutdown()


def test_retry_request_hides_a_failure_as_nbdkit_does(
    tmp_path: Path, start_node: StartNode, start_nbdkit: StartNbdkit
) -> None:
    """The trigger file goes while the filter waits before its retry: in both servers the
    client's write, zero and read succeed."""
    ours_trigger, theirs_trigger = tmp_path / "ours", tmp_path / "theirs"
    err = start_node(
        "error", "error-rate=100%", f"error-file={ours_trigger}",
        upstreams=[start_node("memory", "1M").uri],
    )  # fmt: skip
    ours = start_node("retry-request", "retry-request-delay=1", upstreams=[err.uri])
    theirs = start_nbdkit(
        "--filter=retry-request", "--filter=error", "memory", "1M", "error-rate=100%",
        f"error-file={theirs_trigger}", "retry-request-delay=1",
    )  # fmt: skip
    calls: list[Callable[[Any], Any]] = [
        lambda h: h.pwrite(b"z" * 4096, 0),
        lambda h: h.zero(4096, 4096),
        lambda h: bytes(h.pread(8192, 0)),
    ]
    for uri, trigger in ((ours.uri, ours_trigger), (theirs.uri, theirs_trigger)):
        h = nbd_connect(uri)
        for call in calls:
            trigger.touch()
            running = Background(functools.partial(call, h))
            time.sleep(0.3)  # the first try has failed; the retry comes at 1s
            trigger.unlink()
            assert running.join().error is None
        assert running.result == b"z" * 4096 + bytes(4096)
        h.shutdown()


def test_retry_request_gives_up_with_the_errno_nbdkit_gives(
    start_node: StartNode, start_nbdkit: StartNbdkit, control: Callable[[Proc], Control]
) -> None:
    """Every try fails: after retry-request-retries retries the client gets the upstream's
    errno, as from nbdkit; the upstream saw 1 + retries tries of each request."""
    inject = ["error-pread=EPERM", "error-pread-rate=100%", "error-pwrite=ENOSPC",
              "error-pwrite-rate=100%", "error-trim-rate=100%"]  # fmt: skip
    err = start_node("error", *inject, upstreams=[start_node("memory", "1M").uri], control=True)
    ours = start_node(
        "retry-request", "retry-request-retries=1", "retry-request-delay=100ms",
        upstreams=[err.uri], control=True,
    )  # fmt: skip
    theirs = start_nbdkit(
        "--filter=retry-request", "--filter=error", "memory", "1M", *inject,
        "retry-request-retries=1", "retry-request-delay=1",
    )  # fmt: skip
    requests = [
        ("read", lambda h: h.pread(512, 0)),
        ("write", lambda h: h.pwrite(b"x" * 512, 0)),
        ("trim", lambda h: h.trim(4096, 0)),
        ("zero", lambda h: h.zero(4096, 0)),
    ]
    seen = {}
    for uri in (ours.uri, theirs.uri):
        h = nbd_connect(uri)
        for what, call in requests:
            seen.setdefault(what, []).append(errno_of(call, h))
        h.shutdown()
    assert seen == {
        "read": ["EPERM", "EPERM"],
        "write": ["ENOSPC", "ENOSPC"],
        "trim": ["EIO", "EIO"],
        "zero": [None, None],
    }
    assert control(err).status()["injected"] == {
        "pread": 2, "pwrite": 2, "trim": 2, "zero": 0, "extents": 0, "cache": 0, "flush": 0
    }  # fmt: skip
    assert (control(ours).status()["gave_up"], control(ours).status()["retried"]) == (3, 3)


#: An nbdkit sh plugin whose zero always fails with ENOTSUP (nbdkit's error filter cannot
#: inject ENOTSUP).
NO_ZERO_SH = """#!/bin/sh
case "$1" in
  get_size) echo 1M ;;
  can_write|can_zero|can_fast_zero) exit 0 ;;
  pread) head -c "$3" /dev/zero ;;
  pwrite) cat >/dev/null ;;
  zero) echo "ENOTSUP cannot zero" >&2; exit 1 ;;
  *) exit 2 ;;
esac
"""


def test_retry_request_answers_a_fast_zero_at_once(
    tmp_path: Path, start_node: StartNode, start_nbdkit: StartNbdkit
) -> None:
    """ENOTSUP to a fast zero is the answer ("not fast here"), not a failure: ours gives it
    at once, where nbdkit retries it, and the client waits two retries (2 x 1s) for it. (Ours
    waits 30 s before a retry: if it retried, the zero would take that long.)"""
    script = tmp_path / "nozero.sh"
    script.write_text(NO_ZERO_SH)
    script.chmod(0o755)
    refusing = start_node(
        "error", "error-zero=ENOTSUP", "error-zero-rate=100%",
        upstreams=[start_node("memory", "1M").uri],
    )  # fmt: skip
    ours = start_node("retry-request", "retry-request-delay=30", upstreams=[refusing.uri])
    theirs = start_nbdkit("--filter=retry-request", "sh", str(script), "retry-request-delay=1")
    took = {}
    for name, uri in (("ours", ours.uri), ("theirs", theirs.uri)):
        h = nbd_connect(uri)
        assert h.can_fast_zero()
        started = time.monotonic()
        assert errno_of(h.zero, 4096, 0, nbd.CMD_FLAG_FAST_ZERO) == "ENOTSUP"
        took[name] = time.monotonic() - started
        assert errno_of(h.zero, 4096, 0) is None  # written as zeros, below or by the server
        h.shutdown()
    assert took["ours"] < 30 and took["theirs"] >= 2, took


def test_retry_request_readonly_refuses_writes_after_a_failure(
    tmp_path: Path, start_node: StartNode
) -> None:
    trigger = tmp_path / "failing"
    err = start_node(
        "error", "error-pread-rate=100%", f"error-file={trigger}",
        upstreams=[start_node("memory", "1M").uri],
    )  # fmt: skip
    node = start_node(
        "retry-request", "retry-request-readonly=true", "retry-request-delay=300ms",
        upstreams=[err.uri],
    )  # fmt: skip
    h = nbd_connect(node.uri)
    assert errno_of(h.pwrite, b"ok" * 256, 0) is None
    trigger.touch()
    read = Background(lambda: h.pread(512, 0))
    time.sleep(0.1)
    trigger.unlink()
    assert read.join().error is None  # the read was retried and worked...
    # ...and writes are refused now (EROFS, which NBD carries as EPERM).
    assert errno_of(h.pwrite, b"no" * 256, 0) == "EPERM"
    assert errno_of(h.zero, 512, 0) == "EPERM"
    h.shutdown()
    h = nbd_connect(node.uri)  # a new connection writes
    assert errno_of(h.pwrite, b"ok" * 256, 512) is None
    h.shutdown()


def test_retry_request_open_waits_for_an_upstream_that_comes_back(
    tmp_path: Path, start_node: StartNode, control: Callable[[Proc], Control]
) -> None:
    """The upstream is down when a client connects: with retry-request-open (default) the
    client waits, and starts once the upstream is back; if it stays down past the retries,
    the client is disconnected."""
    sock = tmp_path / "disk.sock"
    mem = start_node("memory", "1M", listen=f"unix:{sock}")
    node = start_node(
        "retry-request", "retry-request-retries=20", "retry-request-delay=200ms",
        upstreams=[mem.uri], control=True,
    )  # fmt: skip
    mem.stop()
    ctl = control(node)
    wait_for(lambda: ctl.status()["upstreams"][0]["state"] != "up", 10, "the upstream down")
    client = Background(lambda: bytes(nbd_connect(node.uri).pread(512, 0)))
    wait_for(lambda: ctl.status()["open_waits"] >= 2, 10, "the client to wait")
    start_node("memory", "1M", listen=f"unix:{sock}")
    assert client.join().error is None and client.result == bytes(512)

    gone = start_node("memory", "1M")
    short = start_node(
        "retry-request", "retry-request-retries=2", "retry-request-delay=100ms",
        upstreams=[gone.uri], control=True,
    )  # fmt: skip
    gone.stop()
    wait_for(lambda: control(short).status()["upstreams"][0]["state"] != "up", 10, "down")
    h = nbd_connect(short.uri)  # the handshake is the node's own...
    with pytest.raises(nbd.Error):
        h.pread(512, 0)  # ...but this connection is closed once the waits are over
    assert control(short).status()["open_waits"] == 2


@pytest.mark.parametrize(
    ("word", "message"),
    [
        ("retry-request-delay=0", "cannot be 0"),
        ("retry-request-retries=1001", "retry-request-retries"),
        ("retry-request-retries=-1", "retry-request-retries"),
        ("retry-request-open=sometimes", "retry-request-open"),
    ],
)
def test_retry_request_bad_params_exit_1(word: str, message: str) -> None:
    stderr = refusal("retry-request", word)
    assert message in stderr, stderr


def test_a_proxy_advertises_no_more_than_it_takes(
    start_nbdkit: StartNbdkit, start_node: StartNode
) -> None:
    """An upstream that advertises a maximum of 4G-1 (nbdkit's default once any block size is
    set): a node over it advertises the 64M its session takes, and takes it."""
    up = start_nbdkit("--filter=blocksize-policy", "memory", "128M", "blocksize-preferred=64K")
    assert block_sizes(up.uri) == (1, 64 * KiB, 0xFFFFFFFF)
    node = start_node("nbd", upstreams=[up.uri])
    assert block_sizes(node.uri) == (1, 64 * KiB, 64 * MiB)
    h = nbd_connect(node.uri)  # (libnbd itself sends no more than 64M: ERANGE)
    assert len(h.pread(64 * MiB, 0)) == 64 * MiB
    h.shutdown()
