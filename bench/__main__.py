"""Side-by-side benchmark: nbdfabric nodes against nbdkit, in the same run, reporting ratios.

    python -m bench [--suite core,chain,window,file,fan,parity,source,luks,ext2] [--runs 3]
                    [--size 512M] [--seconds 5] [--poll-max-us N] [--workers N] [--json FILE]

Each suite starts our topology and nbdkit's of the same shape, then runs the same workloads on both,
interleaved (ours, theirs, theirs, ours, ...) and reports the median of the runs and the ratio
ours / nbdkit (> 1 means we are faster). Workloads: nbdcopy read and write (`--no-extents -S 0` so
the bytes really move; the first write into a fresh disk is discarded) at 1 MiB and 256 KiB, and
fio's nbd engine for 4 KiB random reads and writes at queue depth 1 and 16. The source suite
(our http node against `nbdkit -r curl`, both reading the bench's image from one local HTTP
server, bench/http_server.py) is read-only: reads only.

Beside each ratio it reports the CPU time the servers of each side used (all their processes: a
chain's proxies and its memory node), per request for fio and per GiB for nbdcopy, split into user
and kernel time. Throughput swings with the scheduler from run to run; CPU per unit of work swings
much less, and says where the time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from nodes import registry
from nodes.values import parse_size

ROOT = Path(__file__).resolve().parent.parent
NODE = [sys.executable, "-m", "nodes.cli", "node"]


@dataclass
class Server:
    uri: str
    pids: list[int]  #: every process serving this export (a chain: all its nodes)

    def over(self, *below: Server) -> Server:
        """This server with the processes it stands on, so their CPU is counted with it."""
        return Server(self.uri, self.pids + [pid for b in below for pid in b.pids])


@dataclass
class Cpu:
    """User and kernel CPU seconds of a set of processes, all their threads (those that ended
    too) included: /proc/PID/stat, in clock ticks (10 ms), so sum it over runs."""

    user: float = 0.0
    system: float = 0.0

    @classmethod
    def of(cls, pids: list[int]) -> Cpu:
        tick = os.sysconf("SC_CLK_TCK")
        cpu = cls()
        for pid in pids:
            fields = stat_fields(pid)
            cpu.user += int(fields[11]) / tick  # utime, stime: fields 14 and 15 of proc(5)
            cpu.system += int(fields[12]) / tick
        return cpu

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(self.user - other.user, self.system - other.system)

    def __add__(self, other: Cpu) -> Cpu:
        return Cpu(self.user + other.user, self.system + other.system)

    def per(self, units: float) -> dict[str, float]:
        """Total, user and kernel CPU per unit of work."""
        if not units:
            return {"total": 0.0, "user": 0.0, "system": 0.0}
        user, system = self.user / units, self.system / units
        return {"total": user + system, "user": user, "system": system}


class Fabric:
    """Starts processes in a temp dir and stops them all at exit."""

    def __init__(self, tmp: Path, stack: ExitStack, node_args: tuple[str, ...] = ()) -> None:
        self.tmp = tmp
        self.stack = stack
        self.n = 0
        self.node_args = node_args  #: given to every node of ours (e.g. --poll-max-us)

    def _wait(self, proc: subprocess.Popen[bytes], ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 30
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start")
            time.sleep(0.02)

    def _spawn(self, cmd: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def stop() -> None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

        self.stack.callback(stop)
        return proc

    def node(self, kind: str, *args: str, upstreams: tuple[str, ...] = (), tcp: bool = False):
        self.n += 1
        ready = self.tmp / f"n{self.n}.json"
        listen = "127.0.0.1:0" if tcp else f"unix:{self.tmp}/n{self.n}.sock"
        options = self.node_args
        if "--workers" in options and not registry.get(kind).shareable:
            at = options.index("--workers")
            options = options[:at] + options[at + 2 :]  # fans take members, not workers
        cmd = [*NODE, kind, *args, *options, "--listen", listen, "--ready-file", str(ready)]
        for u in upstreams:
            cmd += ["--upstream", u]
        proc = self._spawn(cmd)
        self._wait(proc, ready.exists, f"node {kind}")
        # With --workers the node is several processes: count them all (ready = all serve).
        return Server(json.loads(ready.read_text())["uri"], [proc.pid, *children_of(proc.pid)])

    def http_server(self, image: Path) -> str:
        """Serve `image`'s directory over HTTP (bench/http_server.py); the image's URL."""
        from .http_server import HttpServer

        server = HttpServer(image.parent)
        self.stack.callback(server.stop)
        return server.url("files", image.name)

    def nbdkit(self, *args: str, tcp: bool = False) -> Server:
        self.n += 1
        if tcp:
            port = _free_port()
            proc = self._spawn(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), *args])
            uri = f"nbd://127.0.0.1:{port}/"
            self._wait(proc, lambda: _port_open(port), "nbdkit")
        else:
            sock = self.tmp / f"k{self.n}.sock"
            proc = self._spawn(["nbdkit", "-f", "-U", str(sock), *args])
            uri = f"nbd+unix:///?socket={sock}"
            self._wait(proc, sock.exists, "nbdkit")
        return Server(uri, [proc.pid])


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat from its third field (state) on, past the name (which may hold spaces)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def children_of(pid: int) -> list[int]:
    """The processes whose parent is `pid` (a node's --workers)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int(stat_fields(int(entry.name))[1])
            except OSError:
                continue  # gone meanwhile
            if parent == pid:
                out.append(int(entry.name))
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# Workloads: each returns a figure where bigger is better (MiB/s or IOPS) --------------------


def nbdcopy_write(uri: str, source: Path, request: int) -> float:
    size = source.stat().st_size
    t0 = time.perf_counter()
    cmd = ["nbdcopy", "--no-extents", "-S", "0", f"--request-size={request}", str(source), uri]
    subprocess.run(cmd, check=True, capture_output=True)
    return size / (time.perf_counter() - t0) / 2**20


def nbdcopy_read(uri: str, size: int, request: int) -> float:
    t0 = time.perf_counter()
    cmd = ["nbdcopy", "--no-extents", "-S", "0", f"--request-size={request}", uri, "null:"]
    subprocess.run(cmd, check=True, capture_output=True)
    return size / (time.perf_counter() - t0) / 2**20


def fio_iops(uri: str, rw: str, depth: int, seconds: float, size: int) -> float:
    cmd = [
        "fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
        f"--iodepth={depth}", f"--runtime={seconds}", "--time_based", f"--size={size}",
        "--output-format=json", "--norandommap", "--randrepeat=0",
    ]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    return float(job["read"]["iops"] + job["write"]["iops"])


# Suites ---------------------------------------------------------------------------------------

Pair = tuple[Server, Server]


def core_pairs(f: Fabric, size: str) -> Iterator[tuple[str, Pair]]:
    yield "memory/unix", (f.node("memory", size), f.nbdkit("memory", size))
    yield "memory/tcp", (f.node("memory", size, tcp=True), f.nbdkit("memory", size, tcp=True))


def chain_pairs(f: Fabric, size: str) -> Iterator[tuple[str, Pair]]:
    m = f.node("memory", size)
    k = f.nbdkit("memory", size)
    hop = f.node("nbd", "relay=false", upstreams=(m.uri,))
    khop = f.nbdkit("nbd", f"uri={k.uri}")
    yield "1-hop proxy", (hop.over(m), khop.over(k))
    m3 = f.node("memory", size)
    a = f.node("nbd", "relay=false", upstreams=(m3.uri,))
    b = f.node("nbd", "relay=false", upstreams=(a.uri,))
    k3 = f.nbdkit("memory", size)
    ka = f.nbdkit("nbd", f"uri={k3.uri}")
    kb = f.nbdkit("nbd", f"uri={ka.uri}")
    yield "3-hop chain", (b.over(a, m3), kb.over(ka, k3))
    # The same shapes with relaying hops (`nbd`'s default, nodes/server/relay.py; the ones above
    # re-issue each request through libnbd), vs the same nbdkit.
    relay = f.node("nbd", "relay=true", upstreams=(m.uri,))
    yield "1-hop relay", (relay.over(m), khop.over(k))
    ra = f.node("nbd", "relay=true", upstreams=(m3.uri,))
    rb = f.node("nbd", "relay=true", upstreams=(ra.uri,))
    yield "3-hop relay", (rb.over(ra, m3), kb.over(ka, k3))


def window_pairs(f: Fabric, size: str) -> Iterator[tuple[str, Pair]]:
    """An offset node (offset=1M) over a memory node 1M larger than the export, relaying (the
    default) and re-issuing, vs `nbdkit --filter=offset nbd` over `nbdkit memory` of the same
    shape."""
    upstream = str(parse_size(size) + (1 << 20))
    m = f.node("memory", upstream)
    k = f.nbdkit("memory", upstream)
    theirs = f.nbdkit("--filter=offset", "nbd", f"uri={k.uri}", "offset=1M")
    relay = f.node("offset", "offset=1M", upstreams=(m.uri,))
    yield "offset relay", (relay.over(m), theirs.over(k))
    m2 = f.node("memory", upstream)
    reissue = f.node("offset", "offset=1M", "relay=false", upstreams=(m2.uri,))
    yield "offset re-issuing", (reissue.over(m2), theirs.over(k))


def fan_pairs(f: Fabric, size: str) -> Iterator[tuple[str, Pair]]:
    """Not against nbdkit (it has no RAID): a fan over our memory nodes vs one memory node."""
    # Members a quarter of the size each, so both exports hold the same bytes (nbdcopy reads
    # the whole export, and the figures are bytes of the source per second).
    quarter = str(parse_size(size) // 4)
    single = f.node("memory", size)
    members = [f.node("memory", quarter) for _ in range(4)]
    stripe = f.node("stripe", upstreams=tuple(m.uri for m in members))
    yield "stripe x4 vs 1 node", (stripe.over(*members), single)
    pair = [f.node("memory", size) for _ in range(2)]
    mirror = f.node("mirror", upstreams=tuple(m.uri for m in pair))
    yield "mirror x2 vs 1 node", (mirror.over(*pair), f.node("memory", size))


def parity_pairs(f: Fabric, size: str) -> Iterator[tuple[str, Pair]]:
    """Not against nbdkit either: parity over 3 memory nodes (members half the size: the same
    bytes) against one memory node, then its two consistency policies against each other (ppl
    journals every partial write's partial parity, an fdatasync of a file in the suite's
    directory each; bitmap, the default, marks regions)."""
    half = str(parse_size(size) // 2)

    def parity(policy: str) -> Server:
        members = [f.node("memory", half) for _ in range(3)]
        state = f"state-file={f.tmp}/parity-{policy}.state"
        fan = f.node("parity", state, f"consistency-policy={policy}",
                     upstreams=tuple(m.uri for m in members))  # fmt: skip
        return fan.over(*members)

    bitmap = parity("bitmap")
    yield "parity x3 vs 1 node", (bitmap, f.node("memory", size))
    yield "parity x3: ppl vs bitmap", (parity("ppl"), bitmap)


def source_pairs(f: Fabric, image: Path) -> Iterator[tuple[str, Pair]]:
    """Read-only: our http node vs `nbdkit -r curl`, over the same HTTP server and image."""
    url = f.http_server(image)
    yield "http source", (f.node("http", url), f.nbdkit("-r", "curl", f"url={url}"))


def luks_pairs(f: Fabric, size: str) -> Iterator[tuple[str, Pair]]:
    """Our file -> luks chain vs `nbdkit --filter=luks file`, each over its own LUKSv1 image
    (aes-xts-plain64, as qemu-img makes it) of `size` bytes of payload."""
    images = []
    for side in ("ours", "nbdkit"):
        image = f.tmp / f"{side}.luks"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "luks", "--object", "secret,id=s,data=bench",
             "-o", "key-secret=s,iter-time=10", str(image), size],
            check=True, capture_output=True,
        )  # fmt: skip
        images.append(str(image))
    below = f.node("file", images[0])
    ours = f.node("luks", "passphrase=bench", upstreams=(below.uri,))
    theirs = f.nbdkit("--filter=luks", "file", images[1], "passphrase=bench")
    yield "file -> luks", (ours.over(below), theirs)


def file_pairs(f: Fabric, size: str) -> Iterator[tuple[str, Pair]]:
    """Our file node vs `nbdkit file`, each over its own file of `size` bytes in the suite's
    directory (on the machine's disk; what the copies write stays in the page cache)."""
    files = []
    for side in ("ours", "nbdkit"):
        path = f.tmp / f"{side}.img"
        with open(path, "wb") as out:
            out.truncate(parse_size(size))
        files.append(str(path))
    yield "file", (f.node("file", files[0]), f.nbdkit("file", files[1]))


def ext2_pairs(f: Fabric, size: str) -> Iterator[tuple[str, Pair]]:
    """Our file -> ext2 chain vs `nbdkit --filter=ext2 file`, each over its own ext4 image
    (mkfs.ext4 -d) holding one file, /disk.raw, of `size` bytes of random data: allocated, so
    that writes land on the file's blocks."""
    n = parse_size(size)
    src = f.tmp / "ext2-src"
    src.mkdir()
    with open(src / "disk.raw", "wb") as out:
        for _ in range(n >> 20):
            out.write(os.urandom(1 << 20))
    images = []
    for side in ("ours", "nbdkit"):
        image = f.tmp / f"{side}.ext4"
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-d", str(src), str(image), str(n + n // 8 + (64 << 20))],
            check=True, capture_output=True,
        )  # fmt: skip
        images.append(str(image))
    (src / "disk.raw").unlink()
    below = f.node("file", images[0])
    ours = f.node("ext2", "ext2file=/disk.raw", upstreams=(below.uri,))
    theirs = f.nbdkit("--filter=ext2", "file", images[1], "ext2file=/disk.raw")
    yield "file -> ext2", (ours.over(below), theirs)


def ssh_pairs(f: Fabric, size: str) -> Iterator[tuple[str, Pair]]:
    """Our ssh node vs `nbdkit ssh`, each over a remote file of its own (in /dev/shm when it
    can, so the disk is not measured) on one private sshd on loopback (bench/ssh_server.py)."""
    from .ssh_server import Sshd, usable

    why = usable()
    if why is not None:
        raise SystemExit(f"bench: the ssh suite needs a private sshd: {why}")
    server = Sshd(f.tmp / "sshd")
    f.stack.callback(server.stop)
    shm = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else f.tmp
    files = []
    for side in ("ours", "nbdkit"):
        path = shm / f"nbdbench-{os.getpid()}-{side}.ssh.img"
        with open(path, "wb") as out:
            out.truncate(parse_size(size))
        f.stack.callback(path.unlink, missing_ok=True)
        files.append(str(path))
    ours = f.node("ssh", *server.args(), files[0])
    theirs = f.nbdkit("ssh", *server.args(), files[1])
    yield "ssh (sftp)", (ours, theirs)


#: A RAM disk in nbdkit's python plugin API (as its manual's ramdisk.py): our python node and
#: `nbdkit python` run the very same file.
RAMDISK_SCRIPT = """\
import nbdkit

API_VERSION = 2
disk = bytearray()


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    global disk
    if key == "size":
        disk = bytearray(nbdkit.parse_size(value))


def open(readonly):
    return 1


def get_size(h):
    return len(disk)


def pread(h, buf, offset, flags):
    end = offset + len(buf)
    buf[:] = disk[offset:end]


def pwrite(h, buf, offset, flags):
    end = offset + len(buf)
    disk[offset:end] = buf
"""


def python_pairs(f: Fabric, size: str) -> Iterator[tuple[str, Pair]]:
    """Our python node vs `nbdkit python`, running the same RAM-disk script."""
    script = f.tmp / "ramdisk.py"
    script.write_text(RAMDISK_SCRIPT)
    ours = f.node("python", str(script), f"size={size}")
    theirs = f.nbdkit("python", str(script), f"size={size}")
    yield "python ramdisk", (ours, theirs)


SUITES = {
    "core": core_pairs,
    "chain": chain_pairs,
    "window": window_pairs,
    "fan": fan_pairs,
    "parity": parity_pairs,
    "source": source_pairs,
    "file": file_pairs,
    "luks": luks_pairs,
    "ext2": ext2_pairs,
    "ssh": ssh_pairs,
    "python": python_pairs,
}
#: Suites whose exports cannot be written: only the read workloads run.
READ_ONLY = {"source"}


def run_suite(name: str, f: Fabric, args: argparse.Namespace, source: Path) -> list[dict]:
    size = source.stat().st_size
    rows = []
    read_only = name in READ_ONLY
    pairs = SUITES[name](f, source if read_only else args.size)
    for label, (ours, theirs) in pairs:
        if not read_only:
            for uri in (ours.uri, theirs.uri):  # the first write into a fresh disk is discarded
                nbdcopy_write(uri, source, 1 << 20)
        workloads: list[tuple[str, Callable[[str], float], str]] = [
            ("nbdcopy write 1M", lambda u: nbdcopy_write(u, source, 1 << 20), "MiB/s"),
            ("nbdcopy read 1M", lambda u: nbdcopy_read(u, size, 1 << 20), "MiB/s"),
            ("nbdcopy write 256K", lambda u: nbdcopy_write(u, source, 256 << 10), "MiB/s"),
            ("nbdcopy read 256K", lambda u: nbdcopy_read(u, size, 256 << 10), "MiB/s"),
        ]
        if read_only:
            workloads = [w for w in workloads if "write" not in w[0]]
        if shutil.which("fio"):
            for rw in ("randread",) if read_only else ("randread", "randwrite"):
                for depth in (1, 16):
                    workloads.append(
                        (
                            f"fio 4K {rw} QD{depth}",
                            lambda u, rw=rw, d=depth: fio_iops(u, rw, d, args.seconds, size),
                            "IOPS",
                        )
                    )
        for wname, fn, unit in workloads:
            values: tuple[list[float], list[float]] = ([], [])
            # CPU and work summed over the runs: per request (fio) or per GiB (nbdcopy).
            cpu = [Cpu(), Cpu()]
            work = [0.0, 0.0]
            for i in range(args.runs):
                for side in (0, 1) if i % 2 == 0 else (1, 0):
                    server = (ours, theirs)[side]
                    before = Cpu.of(server.pids)
                    value = fn(server.uri)
                    cpu[side] += Cpu.of(server.pids) - before
                    values[side].append(value)
                    work[side] += value * args.seconds if unit == "IOPS" else size / 2**30
            o, t = statistics.median(values[0]), statistics.median(values[1])
            scale, per = (1e6, "us/req") if unit == "IOPS" else (1.0, "CPU-s/GiB")
            ours_cpu, theirs_cpu = (
                {k: v * scale for k, v in cpu[side].per(work[side]).items()} for side in (0, 1)
            )
            row = {
                "suite": name,
                "setup": label,
                "workload": wname,
                "unit": unit,
                "ours": round(o, 1),
                "theirs": round(t, 1),
                "ratio": round(o / t, 3) if t else None,
                "cpu_unit": per,
                "ours_cpu": {k: round(v, 3) for k, v in ours_cpu.items()},
                "theirs_cpu": {k: round(v, 3) for k, v in theirs_cpu.items()},
            }
            rows.append(row)
            print(
                f"{name:<6} {label:<22} {wname:<22} ours {o:>10.1f} {unit:<5}  "
                f"other {t:>10.1f}  ratio {row['ratio']:<6}  {per} ours "
                f"{_cpu_text(ours_cpu)} other {_cpu_text(theirs_cpu)}",
                flush=True,
            )
    return rows


def _cpu_text(cpu: dict[str, float]) -> str:
    """total (user+kernel), to 3 significant figures."""
    return f"{cpu['total']:.3g} ({cpu['user']:.3g}+{cpu['system']:.3g})"


def idle_rss_mib(f: Fabric) -> float:
    server = f.node("memory", "1G")
    time.sleep(0.5)
    with open(f"/proc/{server.pids[0]}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument(
        "--suite",
        default="core,chain",
        help="comma list of: core, chain, window, file, fan, parity, source, luks, ext2, ssh, "
        "python",
    )
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--size", default="512M", help="disk size and bytes copied per nbdcopy run")
    p.add_argument("--seconds", type=float, default=5, help="fio run time per measurement")
    p.add_argument(
        "--poll-max-us",
        type=int,
        default=0,
        metavar="N",
        help="run our nodes with --poll-max-us N (adaptive polling before sleeping; 0: off)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="run our nodes with --workers N (N processes per node; 1: one, the default)",
    )
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    rows: list[dict] = []
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="nbdbench") as tmp:
        source = _make_source(Path(tmp), parse_size(args.size))
        f = Fabric(Path(tmp), stack)
        rss = idle_rss_mib(f)
        print(f"idle memory node RSS: {rss:.1f} MiB", flush=True)
        for name in args.suite.split(","):
            with ExitStack() as suite_stack:
                suite_dir = Path(tmp) / name  # fresh names: old ready files must not be read
                suite_dir.mkdir()
                fabric = Fabric(suite_dir, suite_stack, _node_args(args))
                rows += run_suite(name, fabric, args, source)
    if args.json:
        report = {
            "idle_rss_mib": rss,
            "poll_max_us": args.poll_max_us,
            "workers": args.workers,
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def _node_args(args: argparse.Namespace) -> tuple[str, ...]:
    """The options our nodes get in every suite (the fan suite's stripe and mirror cannot take
    --workers: only their members do)."""
    out: tuple[str, ...] = ()
    if args.poll_max_us:
        out += ("--poll-max-us", str(args.poll_max_us))
    if args.workers > 1:
        out += ("--workers", str(args.workers))
    return out


def _make_source(tmp: Path, size: int) -> Path:
    """A file of incompressible-looking data in RAM-backed tmp (so the disk is not measured)."""
    shm = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else tmp
    path = shm / f"nbdbench-{os.getpid()}.img"
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(block)
    import atexit

    atexit.register(lambda: path.unlink(missing_ok=True))
    return path


if __name__ == "__main__":
    sys.exit(main())
