"""What WRITE headers with no payload behind them cost a server: its RSS, ours beside nbdkit's.

    .venv/bin/python -m bench.write_headers [--clients 32] [--size 32M]

Each client connects (structured replies, OPT_GO), sends the header of one WRITE of `--size`
bytes and nothing more, and waits. A server that makes the whole payload's buffer when the
header comes holds `--size` per client for a few bytes sent; one that makes it as the payload
arrives holds next to nothing. Measured on a file export (a sparse file in /dev/shm) and a
memory export, for `nbdfabric node` and `nbdkit`, once the server has read every header (the
clients' unread send queues are empty).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nodes.values import parse_size

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import rss_kib  # noqa: E402
from test_server_raw import Raw  # noqa: E402


def measure(cmd: list[str], sock: str, clients: int, size: int) -> tuple[float, float]:
    """(idle RSS, RSS with every client's header read), in MiB."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} did not start")
            time.sleep(0.05)
        time.sleep(0.3)
        idle = rss_kib(proc.pid) / 1024
        conns = []
        for i in range(clients):
            r = Raw(sock)
            r.handshake()
            r.request(1, 0, size, cookie=i + 1)  # NBD_CMD_WRITE, no payload
            conns.append(r)
        while any(r.unread() for r in conns):
            time.sleep(0.05)
        time.sleep(0.5)  # the header read, its buffer made: a moment for the rest to settle
        held = rss_kib(proc.pid) / 1024
        for r in conns:
            r.close()
        return idle, held
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--size", default="32M", help="each WRITE's announced length (max 32M)")
    args = ap.parse_args()
    size = parse_size(args.size)
    total = max(size, 1 << 30)
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        disk = Path(tmp) / "disk.img"
        with disk.open("wb") as f:
            f.truncate(total)
        sock = f"{tmp}/s.sock"
        ours = [str(ROOT / ".venv/bin/nbdfabric"), "node"]
        servers = {
            "nbdfabric file": [*ours, "file", str(disk), "--unix", sock],
            "nbdkit file": ["nbdkit", "-f", "-U", sock, "file", str(disk)],
            "nbdfabric memory": [*ours, "memory", str(total), "--unix", sock],
            "nbdkit memory": ["nbdkit", "-f", "-U", sock, "memory", str(total)],
        }
        print(f"{args.clients} clients, each the header of a {args.size} WRITE and no payload")
        print(f"{'server':<18} {'idle RSS':>10} {'with headers':>13} {'per client':>11}")
        for name, cmd in servers.items():
            idle, held = measure(cmd, sock, args.clients, size)
            per = (held - idle) / args.clients
            print(f"{name:<18} {idle:>8.0f} M {held:>11.0f} M {per:>9.2f} M")
            if os.path.exists(sock):
                os.unlink(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
