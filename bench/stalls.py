"""What one client's disk work costs another's latency: our file node and `nbdkit file` side by
side, each over its own copy of a file of random data on the machine's disk.

    python -m bench.stalls [--size 512M] [--seconds 4] [--disturb none,trim,partial]

fio reads 4K at random at queue depth 1 from the first 64M (cached) while a second client, on
its own connection, does one of:

- `trim`: trims 64K at random places of the rest (punching holes in data the disk holds);
- `partial`: writes 512 bytes at random unaligned places of the rest, which is not cached (the
  kernel reads each page from the disk before the write can go into it);
- `none`: nothing (the reference).

Prints the reader's IOPS and latency percentiles and what the second client got done. A server
that does such work on the thread that serves every client makes the reader wait for it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nbd

from nodes.values import parse_size

CACHED = 64 << 20  #: the reader's part of the file, cached before each run


def _serve(side: str, image: Path, sock: Path) -> subprocess.Popen[bytes]:
    if side == "ours":
        cmd = [sys.executable, "-m", "nodes.cli", "node", "file", str(image), "--listen",
               f"unix:{sock}"]  # fmt: skip
    else:
        cmd = ["nbdkit", "-f", "-U", str(sock), "file", str(image)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"bench.stalls: the {side} server did not start")
        time.sleep(0.05)
    return proc


def _disturb(uri: str, how: str, size: int, stop: threading.Event, done: list[int]) -> None:
    h = nbd.NBD()
    h.connect_uri(uri)
    small = os.urandom(512)
    while not stop.is_set():
        if how == "trim":
            h.trim(65536, random.randrange(CACHED, size - 65536, 65536))
        else:
            h.pwrite(small, random.randrange(CACHED, size - 1024, 512) + 100)
        done[0] += 1
    h.shutdown()


def run_one(side: str, how: str, image: Path, source: Path, tmp: Path, seconds: float) -> dict:
    shutil.copyfile(source, image)
    with open(image, "rb") as f:  # the rest uncached; the reader's part cached
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        os.pread(f.fileno(), CACHED, 0)
    sock = tmp / f"{side}.sock"
    server = _serve(side, image, sock)
    uri = f"nbd+unix:///?socket={sock}"
    stop, done = threading.Event(), [0]
    other = threading.Thread(target=_disturb, args=(uri, how, image.stat().st_size, stop, done))
    try:
        if how != "none":
            other.start()
        cmd = ["fio", "--name=reader", "--ioengine=nbd", f"--uri={uri}", "--rw=randread",
               "--bs=4k", "--iodepth=1", f"--runtime={seconds}", "--time_based",
               f"--size={CACHED}", "--output-format=json", "--norandommap",
               "--randrepeat=0"]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    finally:
        stop.set()
        if other.is_alive():
            other.join()
        server.terminate()
        server.wait()
        sock.unlink(missing_ok=True)
    read = json.loads(out[out.index("{") :])["jobs"][0]["read"]
    pct = read["clat_ns"]["percentile"]
    return {
        "side": side,
        "disturb": how,
        "iops": read["iops"],
        "p50_us": pct["50.000000"] / 1e3,
        "p99_us": pct["99.000000"] / 1e3,
        "p999_us": pct["99.900000"] / 1e3,
        "other_ops": done[0],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stalls", description=__doc__.splitlines()[0])
    p.add_argument("--size", default="512M", help="the file's size")
    p.add_argument("--seconds", type=float, default=4, help="fio run time per measurement")
    p.add_argument("--disturb", default="none,trim,partial", help="comma list (see above)")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    size = parse_size(args.size)
    if size <= 2 * CACHED:
        raise SystemExit("bench.stalls: --size must be more than 128M")
    rows = []
    with tempfile.TemporaryDirectory(prefix="nbdstalls", dir="/var/tmp") as name:
        tmp = Path(name)
        source = tmp / "source.img"
        with open(source, "wb") as f:
            for _ in range(size >> 20):
                f.write(os.urandom(1 << 20))
        for how in args.disturb.split(","):
            for side in ("ours", "nbdkit"):
                row = run_one(side, how, tmp / f"{side}.img", source, tmp, args.seconds)
                rows.append(row)
                print(
                    f"{how:<8} {side:<7} reader {row['iops']:>8.0f} IOPS  p50 "
                    f"{row['p50_us']:>6.0f} µs  p99 {row['p99_us']:>6.0f} µs  p99.9 "
                    f"{row['p999_us']:>6.0f} µs  other client {row['other_ops']} ops",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
