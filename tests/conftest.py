"""Shared fixtures: captive nodes and nbdkit peers on unix sockets under tmp_path.

`start_node("memory", "64M")` runs a real `nbdfabric node` process and waits for its ready file;
`start_nbdkit("memory", "64M")` runs a real nbdkit beside it. Both are stopped at teardown.
`make_certificates(DIR)` writes a test CA and a server certificate for `--tls-certificates`.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nbd
import pytest

from nodes.base import Backend, Capabilities, Extents, Filter, Holes
from nodes.plugins.memory import Memory, MemoryParams

ROOT = Path(__file__).resolve().parent.parent
NBDFABRIC = [sys.executable, "-m", "nodes.cli"]
_counter = itertools.count()

#: The files that take longest, longest first (minutes each: the bounded fuzz and soak runs,
#: the docker tests with their image build, the orchestrator's restarts). `make test` hands
#: whole files to its workers in collection order (`--dist loadfile --no-loadscope-reorder`):
#: started first, they run beside the many short files instead of alone at the end.
LONG_FILES = (
    "test_fuzz_nodes.py",
    "test_orchestrator.py",
    "test_soak.py",
    # Its image is built in the background from the start of `make test` (prebuild-image):
    # the worker that takes it some minutes in finds it built, instead of waiting for it.
    "test_docker.py",
    "test_fan_process.py",
    # Few tests but long ones: sorted by their count they came last, and a worker that drew
    # one there kept the run going while the others had nothing left.
    "test_bench.py",
    "test_plugin_http.py",
    "test_chain.py",
)


def pytest_configure(config: pytest.Config) -> None:
    """Tests send SIGHUP to the nodes and `up`s they start, as a closing terminal would. Under
    `nohup` (or any runner that ignores SIGHUP) those would inherit the ignored signal and
    keep ignoring it, as they should there (test_lifecycle_sighup_ignored_under_nohup), and
    the tests would wait on them for good. A handler that does nothing keeps this process
    through a hangup as nohup meant, and the programs it starts begin with the default: exec
    resets a handled signal, not an ignored one."""
    if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        signal.signal(signal.SIGHUP, lambda signum, frame: None)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Long files first (LONG_FILES), then the others by their number of tests, most first;
    the order within a file is kept."""
    counts: dict[str, int] = {}
    for item in items:
        counts[item.path.name] = counts.get(item.path.name, 0) + 1

    def rank(item: pytest.Item) -> tuple[int, int]:
        name = item.path.name
        if name in LONG_FILES:
            return LONG_FILES.index(name), 0
        return len(LONG_FILES), -counts[name]

    items.sort(key=rank)  # stable: a file's tests stay in their order


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    uri: str
    socket: str = ""
    control: str | None = None
    metrics: str | None = None
    info: dict = field(default_factory=dict)
    log: Path | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def stderr(self) -> str:
        return self.log.read_text() if self.log and self.log.exists() else ""


def wait_for(
    predicate: Callable[[], object],
    timeout: float = 20,
    what: str = "condition",
    interval: float = 0.02,
):
    """Poll `predicate` until it is true (returned) or `timeout` passes (TimeoutError). A
    predicate that runs a CLI process costs a core for a while: give it a longer interval."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Start `nbdfabric node KIND ARGS...` on a fresh unix socket; returns a Proc once ready."""
    procs: list[Proc] = []

    def start(kind: str, *args: str, listen: str | None = None, control: bool = False,
              upstreams: tuple[str, ...] | list[str] = (), extra: tuple[str, ...] = (),
              wait: bool = True, env: dict[str, str] | None = None,
              pass_fds: tuple[int, ...] = ()) -> Proc:  # fmt: skip
        n = next(_counter)
        sock = str(tmp_path / f"node{n}.sock")
        ready = tmp_path / f"node{n}.json"
        log = tmp_path / f"node{n}.log"
        cmd = [*NBDFABRIC, "node", kind, *args, "--listen", listen or f"unix:{sock}"]
        cmd += ["--ready-file", str(ready), "--name", f"{kind}{n}"]
        for u in upstreams:
            cmd += ["--upstream", u]
        if control:
            cmd += ["--control", f"unix:{tmp_path}/control{n}.sock"]
        cmd += list(extra)
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log.open("wb"),
            env={**os.environ, **(env or {})},
            pass_fds=pass_fds,
        )
        p = Proc(proc, uri="", socket=sock, log=log)
        procs.append(p)
        if not wait:
            return p

        def ready_or_dead() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"node {kind} exited {proc.returncode}: {log.read_text()}")
            return ready.exists()

        wait_for(ready_or_dead, 30, f"node {kind} to be ready")
        p.info = json.loads(ready.read_text())
        p.uri, p.control, p.metrics = p.info["uri"], p.info.get("control"), p.info.get("metrics")
        return p

    yield start
    for p in reversed(procs):  # clients first: a server waits for its clients to leave
        p.stop()


@pytest.fixture
def start_nbdkit(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Start `nbdkit [--filter=F ...] PLUGIN ARGS...` on a unix socket (a peer to compare with)."""
    if shutil.which("nbdkit") is None:
        pytest.fail("nbdkit is not installed: run `make setup`")
    procs: list[Proc] = []

    def start(
        *args: str, pass_fds: tuple[int, ...] = (), env: dict[str, str] | None = None
    ) -> Proc:
        n = next(_counter)
        sock = str(tmp_path / f"nbdkit{n}.sock")
        log = tmp_path / f"nbdkit{n}.log"
        proc = subprocess.Popen(
            ["nbdkit", "-f", "-U", sock, *args],
            stdout=subprocess.DEVNULL,
            stderr=log.open("wb"),
            pass_fds=pass_fds,
            env={**os.environ, **(env or {})},
        )
        p = Proc(proc, uri=f"nbd+unix:///?socket={sock}", socket=sock, log=log)
        procs.append(p)

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"nbdkit exited {proc.returncode}: {log.read_text()}")
            # The socket file appears at bind(), before listen(): probe with a connect.
            with socket.socket(socket.AF_UNIX) as probe:
                return probe.connect_ex(sock) == 0

        wait_for(up, 20, "nbdkit socket")
        return p

    yield start
    for p in reversed(procs):  # clients first: a server waits for its clients to leave
        p.stop()


def run(
    cmd: list[str], timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a real client; on failure show its output."""
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} exited {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


def export_info(uri: str) -> dict[str, Any]:
    """`nbdinfo --json` for the (first) export at `uri`."""
    info: dict[str, Any] = json.loads(run(["nbdinfo", "--json", uri]).stdout)
    return info["exports"][0]


#: nbdinfo --json's fields for what the client may do and the size (no block sizes, no content
#: guesses): what a node and its peer or proxy must agree on.
CAPABILITIES = (
    "export-size",
    "is_read_only",
    "can_flush",
    "can_fua",
    "can_trim",
    "can_zero",
    "can_fast_zero",
    "can_cache",
    "can_multi_conn",
    "can_df",
)


def capabilities(uri: str, keys: Iterable[str] = CAPABILITIES) -> dict[str, Any]:
    """Those `keys` of export_info(uri) (None where nbdinfo gives none)."""
    info = export_info(uri)
    return {key: info.get(key) for key in keys}


def nbd_connect(uri: str, strict: bool = True, structured: bool = True):
    """A libnbd handle connected to `uri` (strict mode off to probe server-side checks)."""
    import nbd

    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)
    h.set_request_structured_replies(structured)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def rss_kib(pid: int) -> int:
    """The resident memory of process `pid`, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def alive(pid: int) -> bool:
    """The process exists and has not exited (a zombie waiting for its parent has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def make_certificates(
    directory: Path, client: bool = False, ca_name: str = "nbdfabric test CA"
) -> None:
    """A CA and a server certificate in nbdkit's --tls-certificates layout; with `client`, a
    client certificate too (client-cert.pem, client-key.pem: the layout libnbd's and qemu's
    x509 clients read from the same directory)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def key() -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def pem_key(k: rsa.RSAPrivateKey) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())  # fmt: skip

    usage = dict(content_commitment=False, data_encipherment=False, key_agreement=False,
                 encipher_only=False, decipher_only=False)  # fmt: skip
    ca_key = key()
    ca = (
        x509.CertificateBuilder()
        .subject_name(name(ca_name))
        .issuer_name(name(ca_name))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, key_encipherment=False,
                                     key_cert_sign=True, crl_sign=True, **usage), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip

    def leaf(role: str, cn: str, purpose: x509.ObjectIdentifier) -> None:
        leaf_key = key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca.subject)
            .public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True,
                                         key_cert_sign=False, crl_sign=False, **usage),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(ca_key, hashes.SHA256())
        )  # fmt: skip
        (directory / f"{role}-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{role}-key.pem").write_bytes(pem_key(leaf_key))
        os.chmod(directory / f"{role}-key.pem", 0o600)

    directory.mkdir(exist_ok=True)
    (directory / "ca-cert.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    leaf("server", "localhost", ExtendedKeyUsageOID.SERVER_AUTH)
    if client:
        leaf("client", "nbdfabric test client", ExtendedKeyUsageOID.CLIENT_AUTH)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Any]:
    """In-process fans over in-process members on one event loop (test_fan_common.Harness),
    for the fan test files."""
    from test_fan_common import Harness

    h = Harness(tmp_path)
    yield h
    h.close()


# Helpers for tests of filters over in-process or live nodes ----------------------------------


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def every_request_kind(h: Any) -> None:
    """One of each request a script plugin sees, with each flag it can get (writes, FUA,
    zeroes with NO_HOLE and FAST_ZERO, trims, cache, flush, block status with REQ_ONE): for
    comparing the calls our script kinds make with nbdkit's for the same requests."""
    import nbd

    h.pwrite(b"a" * 512, 512)
    h.pwrite(b"a" * 512, 1024, nbd.CMD_FLAG_FUA)
    h.zero(4096, 4096)
    h.zero(4096, 4096, nbd.CMD_FLAG_NO_HOLE)
    h.zero(4096, 8192, nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_FAST_ZERO)
    h.trim(4096, 0, nbd.CMD_FLAG_FUA)
    h.trim(4096, 0)
    h.cache(4096, 0)
    h.flush()
    h.block_status(65536, 0, lambda *a: 0, nbd.CMD_FLAG_REQ_ONE)
    h.block_status(65536, 4096, lambda *a: 0)


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read a MiB at a time (disk images bigger than is wise to hold)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def errno_of(call: Callable[..., object], *args: Any) -> str | None:
    """The errno name of the nbd.Error `call(*args)` raises; None if it succeeds."""
    try:
        call(*args)
    except nbd.Error as exc:
        return str(exc.errno)
    return None


def read_all(uri: str, size: int | None = None) -> bytes:
    """The export's first `size` bytes (default: all of it), read in 1 MiB pieces."""
    h = nbd_connect(uri)
    try:
        size = h.get_size() if size is None else size
        piece = 1 << 20
        return b"".join(bytes(h.pread(min(piece, size - o), o)) for o in range(0, size, piece))
    finally:
        h.shutdown()


def mem(content: bytes = b"", size: int | None = None) -> Memory:
    """An in-process memory backend of `size` bytes (default: len(content)) that begins with
    `content`."""
    m = Memory(MemoryParams(size=len(content) if size is None else size))
    if content:
        m.store.write(memoryview(content), 0)
    return m


class Recording(Filter):
    """Passes reads on, noting each (offset, length), and counts BLOCK_STATUS requests; may
    claim block size limits (and checks that the reads it gets keep them)."""

    def __init__(self, next: Backend, block_min: int = 0, block_max: int = 0) -> None:
        super().__init__(next.params, next)
        self.reads: list[tuple[int, int]] = []
        self.extents_calls = 0
        self.block_min, self.block_max = block_min, block_max

    def capabilities(self) -> Capabilities:
        caps = self.next.capabilities()
        return replace(caps, block_min=self.block_min, block_max=self.block_max)

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        if self.block_min:
            assert offset % self.block_min == 0 and len(buf) % self.block_min == 0
        if self.block_max:
            assert len(buf) <= self.block_max
        self.reads.append((offset, len(buf)))
        return await self.next.pread(buf, offset, flags)

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        self.extents_calls += 1
        return await self.next.extents(count, offset, flags)
