"""Instructions per request, counted by valgrind's callgrind, ours beside nbdkit's.

    python -m bench.instructions [--requests 1000,6000] [--depth 16] [--block 4K] [--json FILE]

Throughput on a small shared machine swings by ±15 % from run to run (bench/RESULTS.md), too much
to see a change of a few per cent on the hot path. An instruction count hardly swings (about 1 %
between runs of our nodes): it does not depend on what else the machine is doing. So this runs the
one server process being measured under `valgrind --tool=callgrind`, drives it with libnbd for N1
and then N2 requests of 4 KiB (or `--block`) at the given queue depth (offsets spread over a
prefilled 16 MiB), and reports (count(N2) - count(N1)) / (N2 - N1): the cost of one request,
start-up and shutdown cancelled out.

It counts user-space instructions of every thread of that process; not the kernel, and not the
cost of a wake-up or a cache miss. Read it as "how much work our code does per request", next to
the throughput figures, not instead of them. Setups:

- `memory`: our memory node vs `nbdkit memory`;
- `hop`: our `nbd` node (`relay=false`: each request re-issued through libnbd) over our
  memory node vs `nbdkit nbd` over `nbdkit memory` (only the proxy is counted);
- `relay`: the same with `nbd relay=true` (the default; nodes/server/relay.py) against the
  same nbdkit hop;
- `cow`: our `cow` node over our memory node vs `nbdkit --filter=cow memory` (the prefill goes
  through it, so the requests are served from the overlay; only the cow is counted);
- `cache`: our `cache` node (writeback) over our memory node vs `nbdkit --filter=cache memory`
  (likewise served from the cache; only the cache is counted);
- `offset`, `offset-reissue`: our `offset` node (offset=1M; relaying, the default, or
  `relay=false`) over our memory node vs `nbdkit --filter=offset memory` (only the offset
  node is counted; nbdkit's filter is in the one process).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbd

from nodes.values import parse_size

ROOT = Path(__file__).resolve().parent.parent
NODE = [sys.executable, "-m", "nodes.cli", "node"]
SIZE = 16 << 20
BLOCK = 4096


def drive(uri: str, requests: int, depth: int, op: str, block: int = BLOCK) -> None:
    """`requests` reads or writes of `block` bytes, `depth` in flight, over the export's first
    SIZE bytes."""
    h = nbd.NBD()
    h.connect_uri(uri)
    blocks = SIZE // block
    bufs = [nbd.Buffer(block) for _ in range(depth)]
    issue = h.aio_pread if op == "read" else h.aio_pwrite
    free = list(range(depth))
    in_flight: dict[int, int] = {}
    issued = done = 0
    while done < requests:
        while free and issued < requests:
            b = free.pop()
            offset = (issued * 7919 % blocks) * block  # a stride prime to the block count
            in_flight[issue(bufs[b], offset)] = b
            issued += 1
        h.poll(-1)
        while in_flight:
            cookie = h.aio_peek_command_completed()
            if cookie <= 0:
                break
            h.aio_command_completed(cookie)
            free.append(in_flight.pop(cookie))
            done += 1
    h.shutdown()


def prefill(uri: str) -> None:
    h = nbd.NBD()
    h.connect_uri(uri)
    chunk = os.urandom(256 << 10)
    for offset in range(0, SIZE, len(chunk)):
        h.pwrite(chunk, offset)
    h.shutdown()


class Run:
    """The processes of one measurement; the one under callgrind is stopped first."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.n = 0

    def start(self, cmd: list[str], counted: bool) -> subprocess.Popen[bytes]:
        if counted:
            out = self.tmp / "callgrind.out"
            cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *cmd]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def node(self, kind: str, *args: str, counted: bool = False) -> str:
        self.n += 1
        ready = self.tmp / f"n{self.n}.json"
        listen = f"unix:{self.tmp}/n{self.n}.sock"
        cmd = [*NODE, kind, *args, "--listen", listen, "--ready-file", str(ready)]
        proc = self.start(cmd, counted)
        _wait(proc, ready.exists)
        return str(json.loads(ready.read_text())["uri"])

    def nbdkit(self, *args: str, counted: bool = False) -> str:
        self.n += 1
        sock = self.tmp / f"k{self.n}.sock"
        proc = self.start(["nbdkit", "-f", "-U", str(sock), *args], counted)
        _wait(proc, lambda: _accepts(sock))
        return f"nbd+unix:///?socket={sock}"

    def stop(self) -> int:
        """Stop everything (the counted process first, so it exits cleanly); its count."""
        for proc in self.procs:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        text = (self.tmp / "callgrind.out").read_text(errors="replace")
        found = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
        if not found:
            raise RuntimeError("callgrind wrote no total")
        return int(found.group(1))


def _wait(proc: subprocess.Popen[bytes], ready: object) -> None:
    deadline = time.monotonic() + 120  # Python under valgrind starts slowly
    while not ready():  # type: ignore[operator]
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args!r} did not start")
        time.sleep(0.1)


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        return probe.connect_ex(str(path)) == 0


def count(setup: str, ours: bool, requests: int, depth: int, op: str, block: int = BLOCK) -> int:
    with tempfile.TemporaryDirectory(prefix="nbdfabric-instr-") as tmp:
        run = Run(Path(tmp))
        try:
            if setup == "memory" and ours:
                uri = run.node("memory", "64M", counted=True)
            elif setup == "memory":
                uri = run.nbdkit("memory", "64M", counted=True)
            elif setup == "cow" and ours:
                upstream = run.node("memory", "64M")
                uri = run.node("cow", "--upstream", upstream, counted=True)
            elif setup == "cow":
                uri = run.nbdkit("--filter=cow", "memory", "64M", counted=True)
            elif setup == "cache" and ours:
                upstream = run.node("memory", "64M")
                uri = run.node("cache", "--upstream", upstream, counted=True)
            elif setup == "cache":
                uri = run.nbdkit("--filter=cache", "memory", "64M", counted=True)
            elif setup.startswith("offset") and ours:
                upstream = run.node("memory", "64M")
                relay = "relay=false" if setup == "offset-reissue" else "relay=true"
                uri = run.node("offset", "offset=1M", relay, "--upstream", upstream, counted=True)
            elif setup.startswith("offset"):
                uri = run.nbdkit("--filter=offset", "memory", "64M", "offset=1M", counted=True)
            elif ours:
                upstream = run.node("memory", "64M")
                relay = ("relay=true",) if setup == "relay" else ("relay=false",)
                uri = run.node("nbd", *relay, "--upstream", upstream, counted=True)
            else:
                upstream = run.nbdkit("memory", "64M")
                uri = run.nbdkit("nbd", f"uri={upstream}", counted=True)
            prefill(uri)
            drive(uri, requests, depth, op, block)
        finally:
            total = run.stop()
        return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    p.add_argument("--setups", default="memory,hop")
    p.add_argument("--ops", default="read,write")
    p.add_argument("--requests", default="1000,6000", help="N1,N2 (the difference is counted)")
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--block", default="4K", help="request size: 4K, 256K, 1M (at most 16M)")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 1
    n1, n2 = (int(x) for x in args.requests.split(","))
    block = parse_size(args.block)
    if not 0 < block <= SIZE:
        p.error(f"--block {args.block}: from 1 byte to {SIZE >> 20}M")
    rows = []
    for setup in args.setups.split(","):
        for op in args.ops.split(","):
            per = {}
            for side, ours in (("ours", True), ("nbdkit", False)):
                low = count(setup, ours, n1, args.depth, op, block)
                high = count(setup, ours, n2, args.depth, op, block)
                per[side] = (high - low) / (n2 - n1)
            ratio = per["ours"] / per["nbdkit"]
            rows.append(
                {"setup": setup, "op": op, "block": block, "depth": args.depth, **per,
                 "ratio": ratio}
            )  # fmt: skip
            print(
                f"{setup:7} {args.block} {op:5} QD{args.depth:<3} ours {per['ours']:>9,.0f}  "
                f"nbdkit {per['nbdkit']:>7,.0f} instructions/request  ours/nbdkit {ratio:5.1f}",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
