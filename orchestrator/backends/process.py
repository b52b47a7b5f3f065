"""The local process backend: every node is an `nbdfabric node` child process, linked to its
upstreams over unix sockets in the fabric's run directory.

Run directory (one per fabric, `RUN` below):
  `--run-dir DIR` or `$NBDFABRIC_RUN_DIR`, else `$XDG_RUNTIME_DIR/nbdfabric`, else
  `.nbdfabric/` beside the topology file; the fabric's own directory is `BASE/<name>/`.
Per node: `RUN/NODE.sock` (internal NBD link), `RUN/NODE.ctl` (gRPC control + health),
`RUN/NODE.json` (ready file), `RUN/NODE.log` (stderr, appended across restarts), and for kinds
with a `state_param` the user left unset, `RUN/NODE.state` (a mirror's bitmap-file: which members
are in sync survives a restart of the fan), and beside it a parity fan's `RUN/NODE.state.journal`.
Supervisor: `RUN/orchestrator.sock` (gRPC), `.pid`, `.lock`, `.log`, and `RUN/state.json`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nodes.server.addresses import UNIX_PATH_MAX
from nodes.spawn import nbdfabric_command

from ..argv import export_words, option_words, param_words, state_words, uri_path
from ..names import is_uri, node_ref

if TYPE_CHECKING:  # (not at run time: `status` and `down` start without the typed schema)
    from ..topology import Node, Topology


class StartError(RuntimeError):
    """A node did not come up: it exited, or never became ready or healthy."""


def run_base(topology_dir: str | Path, override: str | None = None) -> Path:
    if override:
        return Path(override).absolute()
    if os.environ.get("NBDFABRIC_RUN_DIR"):
        return Path(os.environ["NBDFABRIC_RUN_DIR"]).absolute()
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "nbdfabric"
    return Path(topology_dir).absolute() / ".nbdfabric"


@dataclass(frozen=True)
class RunDir:
    path: Path

    def sock(self, node: str) -> Path:
        return self.path / f"{node}.sock"

    def ctl(self, node: str) -> Path:
        return self.path / f"{node}.ctl"

    def ready(self, node: str) -> Path:
        return self.path / f"{node}.json"

    def log(self, node: str) -> Path:
        return self.path / f"{node}.log"

    def node_state(self, node: str) -> Path:
        """What the node keeps across its restarts (a mirror's member states and dirty maps);
        removed with the fabric, or when the node's members or params change."""
        return self.path / f"{node}.state"

    @property
    def api(self) -> Path:
        return self.path / "orchestrator.sock"

    @property
    def pidfile(self) -> Path:
        return self.path / "orchestrator.pid"

    @property
    def lockfile(self) -> Path:
        return self.path / "orchestrator.lock"

    @property
    def supervisor_log(self) -> Path:
        return self.path / "orchestrator.log"

    @property
    def state(self) -> Path:
        return self.path / "state.json"

    def internal_uri(self, node: str, export: str = "") -> str:
        """Export `export` of `node` on its socket; "" is the default (a node's only export)."""
        return f"nbd+unix:///{uri_path(export)}?socket={self.sock(node)}"

    def upstream_uri(self, upstream: str) -> str:
        """What `nbdfabric node --upstream` gets for an upstream as the topology writes it."""
        if is_uri(upstream):
            return upstream
        ref = node_ref(upstream)
        return self.internal_uri(ref.node, ref.export or "")

    def check_paths(self, topology: Topology) -> list[str]:
        """Socket paths too long for the kernel (then pick a shorter run dir)."""
        paths = [self.api] + [p for n in topology.nodes for p in (self.sock(n), self.ctl(n))]
        return [str(p) for p in paths if len(os.fsencode(str(p))) > UNIX_PATH_MAX]

    def remove_node_files(self, node: str, topology: Topology | None = None) -> None:
        for p in (self.sock(node), self.ctl(node), self.ready(node)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        export = topology.export_of(node) if topology else None
        for addr in export.listen if export else ():
            if addr.startswith("unix:"):
                with contextlib.suppress(OSError):
                    if Path(addr[5:]).is_socket():
                        Path(addr[5:]).unlink()


def node_command(node: Node, topology: Topology, run: RunDir, control: bool) -> list[str]:
    cmd = [*nbdfabric_command(), "node", node.kind]
    cmd += param_words(node) + option_words(node)
    cmd += state_words(node, str(run.node_state(node.name)))
    cmd += ["--name", node.name, "--listen", f"unix:{run.sock(node.name)}"]
    cmd += ["--ready-file", str(run.ready(node.name))]
    for up in node.upstreams:
        cmd += ["--upstream", run.upstream_uri(up)]
    export = topology.export_of(node.name)
    if export is not None:
        for addr in export.listen:
            cmd += ["--listen", _from_base(addr, topology.base_dir)]
        cmd += export_words(export)
    if control:
        cmd += ["--control", f"unix:{run.ctl(node.name)}"]
    return cmd


#: How a log line that the supervisor writes before each start of a node begins.
START_MARK = "--- nbdfabric: "
#: A node's (or the supervisor's) log larger than this when it starts is kept as LOG.old (one
#: generation, replacing the last) and a new one begun: logs keep every run, and a fabric that
#: runs for months would otherwise fill its run dir with them.
LOG_ROTATE_BYTES = 8 << 20


def rotate_log(path: Path, limit: int = LOG_ROTATE_BYTES) -> None:
    """Begin a new `path` if it holds more than `limit` bytes, the old one kept as PATH.old."""
    try:
        if path.stat().st_size > limit:
            os.replace(path, path.with_name(path.name + ".old"))
    except FileNotFoundError:
        pass


def exit_text(status: int | None) -> str:
    """How a process ended, as people read it: `killed by SIGKILL`, not `exited with status -9`
    (asyncio's returncode for a death by signal)."""
    if status is not None and status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exited with status {status}"


def _from_base(addr: str, base_dir: str) -> str:
    """A relative `unix:PATH` is beside the topology file, where the node runs; given absolute,
    the URIs `up` and `status` print work from any directory (they said `socket=vm1.sock`)."""
    path = addr.removeprefix("unix:")
    if path == addr or os.path.isabs(path):
        return addr
    return f"unix:{os.path.join(base_dir, path)}"


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log, from its last `--- nbdfabric:` start line on: a node's log
    keeps every run, and a failure quoted the runs before it too."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    text = text[text.rfind("\n" + START_MARK) + 1 :]
    return "\n".join(text.rstrip().splitlines()[-lines:])


class NodeProcess:
    """One node's process: spawn, wait until ready, stop; files under the run dir."""

    def __init__(self, run: RunDir, node: Node, topology: Topology, control: bool) -> None:
        self.run = run
        self.node = node
        self.topology = topology
        self.control_on = control
        self.proc: asyncio.subprocess.Process | None = None
        self.info: dict[str, Any] = {}
        self.started_at = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def container_id(self) -> str:
        return ""

    @property
    def control(self) -> str:
        return f"unix:{self.run.ctl(self.node.name)}" if self.control_on else ""

    async def wait_exit(self, limit: float) -> None:
        """Return when the process exits or after `limit` seconds, whichever comes first."""
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.proc.wait()), limit)

    async def spawn(self) -> None:
        name = self.node.name
        self.run.remove_node_files(name, self.topology)
        cmd = node_command(self.node, self.topology, self.run, self.control_on)
        log = self.run.log(name)
        rotate_log(log)
        with log.open("ab") as f:
            f.write(f"{START_MARK}starting {name}: {' '.join(cmd)}\n".encode())
            # A session of its own: Ctrl-C on a foreground `up` reaches the supervisor only,
            # which then stops the nodes in order.
            self.proc = await asyncio.create_subprocess_exec(
                *cmd,
                cwd=self.topology.base_dir,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=f,
                start_new_session=True,
            )
        self.started_at = time.time()

    async def wait_ready(self, limit: float) -> dict[str, Any]:
        """The ready file's JSON once the node accepts connections; StartError if it exits."""
        assert self.proc is not None
        ready = self.run.ready(self.node.name)
        deadline = time.monotonic() + limit
        while True:
            if self.proc.returncode is not None:
                raise StartError(self.failure(exit_text(self.proc.returncode)))
            if ready.exists():
                with contextlib.suppress(ValueError, OSError):
                    info = json.loads(ready.read_text())
                    if info.get("pid") == self.proc.pid:
                        self.info = info
                        return info
            if time.monotonic() > deadline:
                raise StartError(self.failure(f"not ready after {limit:.0f}s"))
            await self.wait_exit(0.02)

    def failure(self, what: str) -> str:
        tail = log_tail(self.run.log(self.node.name))
        where = self.run.log(self.node.name)
        return f"node {self.node.name!r} {what}" + (f"; {where}:\n{tail}" if tail else "")

    async def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds; removes the node's sockets."""
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
                # A stopped process (SIGSTOP, a debugger gone) sees the SIGTERM only once it
                # runs again, as systemd knows: it sends SIGCONT after SIGTERM too.
                proc.send_signal(signal.SIGCONT)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        self.run.remove_node_files(self.node.name, self.topology)
        return proc.returncode if proc else None

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


class ProcessBackend:
    """Nodes as local child processes (the default backend)."""

    name = "process"

    def __init__(self, run: RunDir, control: bool) -> None:
        self.run = run
        self.control = control

    def new_node(self, node: Node, topology: Topology) -> NodeProcess:
        return NodeProcess(self.run, node, topology, self.control)

    def internal_uri(self, topology: Topology, node: str) -> str:
        return self.run.internal_uri(node)

    def forget_state(self, node: str) -> None:
        state = self.run.node_state(node)
        for path in (state, state.with_name(f"{state.name}.journal")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def prepare(self, topology: Topology) -> None:
        """Nothing to set up before the first node starts."""

    async def teardown(self, fabric: str) -> None:
        """Nothing shared is left once the nodes have stopped."""

    def probe(self, handle: NodeProcess) -> bool:
        return probe_nbd(self.run.sock(handle.node.name))


def probe_nbd(path: Path, timeout: float = 2.0) -> bool:
    """Liveness without gRPC: the node's internal socket answers with the NBD greeting."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            return s.recv(8) == b"NBDMAGIC"
    except OSError:
        return False


def pid_matches(pid: int, marker: str) -> bool:
    """Is `pid` alive, not a zombie, and its command line mentions `marker` (pid reuse check)?"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
        return marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, IndexError):
        return False


def kill_leftovers(run: RunDir) -> list[int]:
    """`down` when the supervisor is gone: kill the node processes state.json remembers."""
    killed = []
    try:
        state = json.loads(run.state.read_text())
    except (OSError, ValueError):
        state = {}
    for name, entry in (state.get("nodes") or {}).items():
        pid = int(entry.get("pid") or 0)
        if pid and pid_matches(pid, str(run.ready(name))):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    sup = int(state.get("supervisor_pid") or 0)
    if sup and pid_matches(sup, "orchestrator"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(sup, signal.SIGKILL)
        killed.append(sup)
    for pid in killed:
        while pid_matches(pid, ""):
            time.sleep(0.02)
    return killed


def clean_run_dir(run: RunDir, keep_logs: bool = True) -> None:
    """Remove every socket, ready file and state file; logs stay for `nbdfabric logs`."""
    if not run.path.is_dir():
        return
    for p in run.path.iterdir():
        if keep_logs and p.name.endswith((".log", ".log.old")):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    with contextlib.suppress(OSError):
        run.path.rmdir()  # only when nothing (no log) is left
