"""`nbdfabric up | down | status | validate | graph | set | logs | events | schema`
(via nodes/cli.py).

Like docker compose, commands find the fabric from `-f FILE` (default ./fabric.yaml) or
`-p NAME`; its run dir is described in orchestrator/backends/process.py. `up` talks to the
fabric's supervisor over gRPC when one runs (re-apply), otherwise starts one: in the foreground
(Ctrl-C stops the fabric in order) or, with `--detach`, as a daemon. `--backend docker` runs
the nodes as containers (orchestrator/backends/docker.py) under the same supervisor; the run dir's
state.json records the backend, so `down` cleans up the right thing even when the supervisor
died.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from nodes.argtypes import whole

from .backends.process import (
    START_MARK,
    RunDir,
    clean_run_dir,
    kill_leftovers,
    log_tail,
    pid_matches,
    rotate_log,
    run_base,
)
from .names import peek_name

if TYPE_CHECKING:
    from .topology import Topology


def load_or_report(path: Path) -> Topology | None:
    """The topology in `path`, or None with its problems printed. Imported here, by the commands
    that read a file: `status`, `down`, `logs` and `events` start without the typed schema."""
    from .topology import load_or_report as load

    return load(path)


DEFAULT_FILE = "fabric.yaml"
#: `status` exit code when the fabric is not running (as `systemctl status`).
NOT_RUNNING = 3


def _err(command: str, message: str) -> None:
    print(f"nbdfabric {command}: {message}", file=sys.stderr)


def _parser(command: str, description: str, file_arg: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"nbdfabric {command}", description=description)
    if file_arg:
        p.add_argument("file", nargs="?", help=f"topology file (default: {DEFAULT_FILE})")
    p.add_argument("-f", "--file", dest="file_opt", metavar="FILE", help="topology file")
    p.add_argument("-p", "--project-name", metavar="NAME", help="fabric name (instead of -f)")
    p.add_argument(
        "--run-dir",
        metavar="DIR",
        help="base of run dirs (default: $NBDFABRIC_RUN_DIR, $XDG_RUNTIME_DIR/nbdfabric, "
        "or .nbdfabric/ beside the file)",
    )
    return p


def _file(args: argparse.Namespace) -> Path:
    return Path(getattr(args, "file", None) or args.file_opt or DEFAULT_FILE)


def _run_dir(args: argparse.Namespace, name: str | None = None) -> tuple[str, RunDir] | None:
    path = _file(args)
    name = name or args.project_name or peek_name(path)
    if name is None:
        return None
    base = run_base(path.absolute().parent, args.run_dir)
    return name, RunDir(base / name)


def _find_fabric(command: str, args: argparse.Namespace) -> tuple[str, RunDir] | None:
    """The fabric a command acts on, or None after saying why there is none."""
    found = _run_dir(args)
    if found is None:
        _err(command, f"no fabric: {_file(args)} not found (use -f FILE or -p NAME)")
    return found


# -- gRPC client --------------------------------------------------------------------------------


class Client:
    """The CLI's side of OrchestratorService on RUN/orchestrator.sock."""

    def __init__(self, run: RunDir) -> None:
        from nodes.control.rpc.nbdfabric.v1 import orchestrator_pb2 as pb
        from nodes.control.rpc.nbdfabric.v1 import orchestrator_pb2_grpc as pb_grpc

        self.pb = pb
        self.channel = grpc.insecure_channel(f"unix:{run.api}")
        self.stub = pb_grpc.OrchestratorServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def alive(self) -> bool:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            reply = health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def connect(run: RunDir) -> Client | None:
    if not run.api.exists():
        return None
    client = Client(run)
    if client.alive():
        return client
    client.close()
    return None


def _rpc_error(exc: grpc.RpcError) -> str:
    details = exc.details() if hasattr(exc, "details") else None
    return str(details or exc)


# -- up -------------------------------------------------------------------------------------------


#: What a FabricExport's `exports` marker adds after each of its URIs (they name no export).
_EXPORTS_NOTE = {
    "directory": "  (directory: one export per file, nbdinfo --list)",
    "names": "  (exportname: the upstream's exports by name, nbdinfo --list)",
    "on-demand": "  (an export made for each name asked for, nbdinfo --list)",
}


def _export_lines(exports: Sequence[Any], prefix: str = "  ") -> list[str]:
    """`PREFIX NAME: URI` for each URI of each export (FabricExport messages)."""
    lines = []
    for e in exports:
        note = _EXPORTS_NOTE.get(e.exports, f"  ({e.exports})" if e.exports else "")
        lines += [f"{prefix}{e.name}: {uri}{note}" for uri in e.uris]
    return lines


def _print_exports(exports: Sequence[Any]) -> None:
    for line in _export_lines(exports):
        _say(line)


def _say(line: object) -> None:
    """A line on stdout, now; if whoever read it is gone (`up | tee log`, and the tee closed),
    nothing more, and no error: stdout goes to /dev/null from then on, so that neither the
    next line nor the flush at exit fails (Python's own advice for a closed pipe)."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


#: How `up` shows an apply's events while it waits (docker compose's plain progress says
#: ` Container NAME  Started`), and the events that end an apply.
_PROGRESS = {"starting": "Starting", "started": "Started", "healthy": "Healthy",
             "start-failed": "Failed", "configured": "Configured",
             "configure-failed": "Not configured", "stopped": "Stopped",
             "restart-needed": "Restart needed",
             "member-offers-less": "Member kept out"}  # fmt: skip
_APPLY_END = ("applied", "apply-failed")


class Progress:
    """`up`'s progress on stderr while the supervisor applies: a line per node as it starts,
    serves, fails or stops (from its events; stdout keeps what `up` printed before). Plain
    lines, without docker compose's redrawing on a terminal: the same in a log or a pipe."""

    def __init__(self, client: Client, names: Sequence[str]) -> None:
        self.since = time.time()  # the supervisor replays what it remembers: not older events
        self.width = max(map(len, names), default=0)
        self.stream = client.stub.WatchFabricEvents(
            client.pb.WatchFabricEventsRequest(replay=True, follow=True)
        )
        self.thread = threading.Thread(target=self._show, name="progress", daemon=True)
        self.thread.start()

    def _show(self) -> None:
        try:
            for ev in self.stream:
                if ev.time < self.since:
                    continue
                if ev.kind in _APPLY_END:
                    return
                if ev.node and ev.kind in _PROGRESS:
                    print(f" Node {ev.node:<{self.width}}  {_PROGRESS[ev.kind]}"
                          f"{_progress_detail(ev)}", file=sys.stderr, flush=True)  # fmt: skip
        except grpc.RpcError:
            pass  # cancelled by close(), or the supervisor went away (`up` says why)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        # The apply's last events may arrive after its reply: wait for its end, unless it did
        # not run (Ctrl-C, a request refused).
        ran = exc is None or (isinstance(exc, grpc.RpcError)
                              and exc.code() == grpc.StatusCode.ABORTED)  # type: ignore[attr-defined]  # fmt: skip
        self.thread.join(5.0 if ran else 0.0)
        self.stream.cancel()
        self.thread.join(1.0)


def _progress_detail(ev: Any) -> str:
    if ev.kind in ("started", "configured"):
        return f" ({ev.message})"
    if ev.kind in ("restart-needed", "member-offers-less"):
        return f": {ev.message}"
    if ev.kind in ("start-failed", "configure-failed"):
        # "node 'x' exited with status 1; RUN/x.log:\n...": `up` prints it all at the end
        first = ev.message.split("\n", 1)[0].split("; ", 1)[0]
        return f": {first.removeprefix(f'node {ev.node!r} ')}"
    return ""


def _apply(client: Client, topology: Topology, path: Path) -> Any:
    return client.stub.Apply(
        client.pb.ApplyRequest(
            topology_yaml=topology.text,
            source=str(path),
            base_dir=topology.base_dir,
        )
    )


def _state(run: RunDir) -> dict[str, Any]:
    try:
        data = json.loads(run.state.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _leftovers(run: RunDir) -> int:
    """`down` when the supervisor is gone: kill the processes, remove the containers."""
    state = _state(run)
    killed = len(kill_leftovers(run))
    if state.get("backend") == "docker" and state.get("fabric"):
        from .backends.docker import DockerFabric

        fabric = str(state["fabric"])
        try:
            docker_fabric = DockerFabric()
            killed += len(docker_fabric.containers(fabric))
            docker_fabric.down(fabric)
        except Exception as exc:  # no engine: say what is left
            _err("down", f"cannot remove the containers of fabric {fabric}: {exc}")
    return killed


def _docker_problem(image: str | None) -> str:
    """Why the docker backend cannot run here, or ""."""
    try:
        import docker
        import docker.errors

        client = docker.from_env()
        client.ping()
    except Exception as exc:
        return f"docker backend: no docker engine reachable ({exc})"
    from .compose import DEFAULT_IMAGE

    image = image or os.environ.get("NBDFABRIC_IMAGE") or DEFAULT_IMAGE
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        return f"docker backend: image {image} not found; build it with scripts/build-image.sh"
    except docker.errors.DockerException as exc:
        return f"docker backend: {exc}"
    finally:
        client.close()
    return ""


def cmd_up(argv: Sequence[str]) -> int:
    p = _parser("up", "Start a fabric, or apply an edited topology to a running one.", True)
    p.add_argument("-d", "--detach", action="store_true", help="run the supervisor in background")
    p.add_argument("--dry-run", action="store_true", help="print what would change, do nothing")
    p.add_argument(
        "--backend",
        choices=("process", "docker"),
        help="run nodes as local processes (default) or docker containers",
    )
    p.add_argument(
        "--image", help="docker backend: the node image (default: $NBDFABRIC_IMAGE or "
        "nbdfabric:latest, built by scripts/build-image.sh)"
    )  # fmt: skip
    args = p.parse_args(argv)
    path = _file(args)
    topology = load_or_report(path)
    if topology is None:
        return 1
    found = _run_dir(args, topology.name)
    assert found is not None
    _, run = found
    too_long = run.check_paths(topology)
    if too_long:
        _err("up", f"socket path too long for unix sockets: {too_long[0]}; use a shorter "
             "--run-dir or $NBDFABRIC_RUN_DIR")  # fmt: skip
        return 1
    client = connect(run)
    if client is not None:
        running = _state(run).get("backend") or "process"
        if args.backend and args.backend != running:
            client.close()
            _err("up", f"fabric {topology.name} runs on the {running} backend; "
                 f"`nbdfabric down` it first to move it to {args.backend}")  # fmt: skip
            return 1
        return _reapply(client, topology, path, args.dry_run)
    if args.dry_run:
        for n in topology.nodes:
            print(f"  {n}: add")
        return 0
    if run.state.exists():  # a supervisor that died: clear what it left
        if stopped := _leftovers(run):
            _err("up", f"fabric {topology.name}: its supervisor had died; stopped the "
                 f"{stopped} processes it left")  # fmt: skip
        clean_run_dir(run)
    backend = args.backend or "process"
    if backend == "docker":
        problem = _docker_problem(args.image)
        if problem:
            _err("up", problem)
            return 1
    if not args.detach:
        return _foreground(run, topology, backend, args.image)
    return _detach(run, topology, path, backend, args.image)


def _reapply(client: Client, topology: Topology, path: Path, dry_run: bool) -> int:
    request = client.pb.ApplyRequest(
        topology_yaml=topology.text, source=str(path), base_dir=topology.base_dir, dry_run=dry_run
    )
    try:
        if dry_run:
            reply = client.stub.Apply(request)
        else:
            with Progress(client, list(topology.nodes)):
                reply = client.stub.Apply(request)
    except grpc.RpcError as exc:
        _err("up", _rpc_error(exc))
        return 1
    except KeyboardInterrupt:
        _err("up", "interrupted: the fabric runs on without the nodes that had not started "
             "yet (`nbdfabric status`); `nbdfabric up` again starts them")  # fmt: skip
        return 128 + signal.SIGINT
    finally:
        client.close()
    for a in reply.actions:
        print(f"  {a.node}: {a.action}{' (' + a.reason + ')' if a.reason else ''}")
    if not dry_run:
        print(f"fabric {topology.name}: applied")
        _print_exports(reply.exports)
    return 0


def _detach(
    run: RunDir, topology: Topology, path: Path, backend: str = "process", image: str | None = None
) -> int:
    run.path.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "orchestrator.daemon", str(run.path), "--backend", backend]
    if image:
        cmd += ["--image", image]
    rotate_log(run.supervisor_log)
    with run.supervisor_log.open("ab") as log:
        daemon = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
            cwd="/",
            env={**os.environ, "PYTHONPATH": _import_root()},
        )
    try:
        client = _wait_for_supervisor(daemon, run)
        if client is None:
            return 1
        with Progress(client, list(topology.nodes)):
            reply = _apply(client, topology, path)
    except KeyboardInterrupt:  # Ctrl-C before the fabric was up: no half-started fabric left
        print("stopping...", file=sys.stderr, flush=True)
        _down(run, connect(run))
        return 128 + signal.SIGINT
    except grpc.RpcError as exc:
        _err("up", _rpc_error(exc))
        _down(run, client)
        return 1
    where = "" if backend == "process" else f"{backend} backend, "
    print(f"fabric {topology.name}: {len(topology.nodes)} nodes up ({where}supervisor pid "
          f"{daemon.pid}, run dir {run.path})")  # fmt: skip
    _print_exports(reply.exports)
    client.close()
    return 0


def _wait_for_supervisor(daemon: subprocess.Popen[bytes], run: RunDir) -> Client | None:
    """A client of the supervisor just started, or None after saying why it exited."""
    while True:
        if daemon.poll() is not None:
            _err("up", f"the supervisor exited ({daemon.returncode}):\n"
                 + log_tail(run.supervisor_log))  # fmt: skip
            return None
        client = connect(run)
        if client is not None:
            return client
        time.sleep(0.05)


def _import_root() -> str:
    """The daemon must import the same orchestrator package as this CLI."""
    root = str(Path(__file__).resolve().parent.parent)
    extra = os.environ.get("PYTHONPATH")
    return f"{root}{os.pathsep}{extra}" if extra else root


def _foreground(
    run: RunDir, topology: Topology, backend: str = "process", image: str | None = None
) -> int:
    import logging

    from .service import AlreadyRunning, export_messages, hosted
    from .supervisor import ApplyError

    logging.basicConfig(level=logging.WARNING)

    async def main() -> int:
        async with hosted(run, backend, image) as sup:
            loop = asyncio.get_running_loop()
            pending: set[asyncio.Future[Any]] = set()
            received: list[int] = []

            def down(sig: int) -> None:
                received.append(sig)
                pending.add(asyncio.ensure_future(sup.down()))  # ends a start under way too
                # Said after the stop began: whoever read the output may be gone (a closed
                # pipe; _say copes, but an error here must not keep the fabric running).
                with contextlib.suppress(OSError):
                    _say("stopping...")

            # SIGHUP too (a closed terminal), as the daemon: the nodes run in sessions of their
            # own and outlived a supervisor it killed. Unless ignored already (nohup).
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                if sig != signal.SIGHUP or signal.getsignal(sig) != signal.SIG_IGN:
                    loop.add_signal_handler(sig, down, sig)

            async def printer() -> None:
                applying = True
                async for event in sup.watch(replay=True):
                    applying = applying and event.kind not in _APPLY_END
                    if applying and event.kind == "start-failed":  # the error below has it all
                        first = event.message.split("\n", 1)[0].split("; ", 1)[0]
                        event = dataclasses.replace(event, message=first)
                    _say(event)

            printing = asyncio.ensure_future(printer())
            try:
                await sup.apply(topology)
            except ApplyError as exc:
                if not received:  # else Ctrl-C (or SIGTERM) came before every node started
                    _err("up", str(exc))
                await sup.down()
                printing.cancel()
                return 128 + received[0] if received else 1
            _say(f"fabric {topology.name}: {len(topology.nodes)} nodes up; Ctrl-C stops it")
            _print_exports(export_messages(sup))
            await sup.finished.wait()
            await asyncio.sleep(0)
            printing.cancel()
            return 0

    try:
        return asyncio.run(main())
    except AlreadyRunning as exc:
        _err("up", str(exc))
        return 1


# -- down / status / logs / set --------------------------------------------------------------------


def _supervisor_pid(run: RunDir) -> int:
    try:
        return int(run.pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _down(run: RunDir, client: Client | None) -> int:
    stopped = 0
    if client is not None:
        pid = _supervisor_pid(run)
        try:
            stopped = len(client.stub.Down(client.pb.DownRequest()).stopped)
        except grpc.RpcError as exc:
            _err("down", f"supervisor did not answer ({_rpc_error(exc)}); killing what is left")
        client.close()
        while pid and pid_matches(pid, "orchestrator"):
            time.sleep(0.02)
    stopped += _leftovers(run)
    clean_run_dir(run)
    return stopped


def _orphans(run: RunDir) -> list[str]:
    """The nodes of a fabric whose supervisor died that still run (state.json's pids)."""
    nodes = _state(run).get("nodes") or {}
    return [
        name
        for name, entry in nodes.items()
        if isinstance(entry, dict)
        and int(entry.get("pid") or 0)
        and pid_matches(int(entry["pid"]), str(run.ready(name)))
    ]


def _left_running(run: RunDir) -> bool:
    """Whether the run dir holds more than the logs a `down` keeps (the files of a fabric whose
    supervisor died, say): then there may be processes to kill and files to remove."""
    return run.path.is_dir() and any(p.suffix != ".log" for p in run.path.iterdir())


def cmd_down(argv: Sequence[str]) -> int:
    args = _parser("down", "Stop every node of a fabric and its supervisor.").parse_args(argv)
    found = _find_fabric("down", args)
    if found is None:
        return 1
    name, run = found
    client = connect(run)
    if client is None and not _left_running(run):
        print(f"fabric {name} is not running")
        return 0
    n = _down(run, client)
    print(f"fabric {name}: down ({n} processes stopped)")
    return 0


def _uptime(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _node_json(n: Any) -> dict[str, Any]:
    """Plain JSON types (MessageToDict would turn int64 into strings); fan members as
    `nbdfabric ctl ADDR members --json` prints them."""
    from nodes.control.cli import to_data

    out: dict[str, Any] = {}
    for field in n.DESCRIPTOR.fields:
        value = getattr(n, field.name)
        if field.label == field.LABEL_REPEATED:
            out[field.name] = [to_data(v) for v in value] if field.message_type else list(value)
        elif field.message_type is not None:
            out[field.name] = to_data(value) if n.HasField(field.name) else None
        else:
            out[field.name] = value
    return out


def _members_text(n: Any) -> str:
    """A fan's members with their states, and its rebuild while one runs."""
    from nodes.control.cli import percent_done, rebuild_subject

    text = " ".join(f"{m.index}:{m.state}" for m in n.members) or "-"
    if n.HasField("rebuild") and n.rebuild.running:
        who = rebuild_subject(n.rebuild) or "running"
        text += f" (rebuild {who}: {percent_done(n.rebuild):.0f}%)"
    return text


def cmd_status(argv: Sequence[str]) -> int:
    p = _parser("status", "Show the nodes of a running fabric.")
    p.add_argument("--json", action="store_true", help="one JSON object per node, in a list")
    args = p.parse_args(argv)
    found = _find_fabric("status", args)
    if found is None:
        return 1
    name, run = found
    client = connect(run)
    if client is None:
        orphans = _orphans(run)
        if args.json:
            print("[]")
        elif orphans:
            print(f"fabric {name} is not running: its supervisor is gone, but nodes "
                  f"{', '.join(orphans)} still run (`nbdfabric down` stops them; "
                  "`nbdfabric up` starts the fabric anew)", file=sys.stderr)  # fmt: skip
        else:
            print(f"fabric {name} is not running", file=sys.stderr)
        return NOT_RUNNING
    try:
        reply = client.stub.Status(client.pb.StatusRequest())
    except grpc.RpcError as exc:
        _err("status", _rpc_error(exc))
        return 1
    finally:
        client.close()
    nodes = [_node_json(n) for n in reply.nodes]
    if args.json:
        print(json.dumps(nodes, indent=2))
        return 0
    docker = reply.backend == "docker"
    where = f"{reply.backend} backend, " if docker else ""
    print(f"fabric {reply.fabric} ({where}supervisor pid {reply.supervisor_pid}, "
          f"run dir {reply.run_dir})")  # fmt: skip
    header: tuple[str, ...] = ("NODE", "KIND", "STATE", "HEALTH", "CONTAINER" if docker
                               else "PID", "UPTIME", "RESTARTS", "EXPORT")  # fmt: skip
    rows: list[tuple[str, ...]] = [
        (
            n.name,
            n.kind,
            n.state,
            n.health,
            (n.container_id if docker else str(n.pid or "")) or "-",
            _uptime(n.uptime_seconds),
            str(n.restarts),
            n.export_name or "-",
        )
        for n in reply.nodes
    ]
    if any(n.role == "fan" for n in reply.nodes):
        header += ("MEMBERS",)
        rows = [
            (*r, _members_text(n) if n.role == "fan" else "")
            for r, n in zip(rows, reply.nodes, strict=True)
        ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    for line in _export_lines(reply.exports, "export "):
        print(line)
    from nodes.control.cli import trust_hint

    for n in reply.nodes:
        hint = trust_hint(n.members, n.control) if n.role == "fan" and n.control else None
        if hint:
            print(f"{n.name}: {hint}")
        if n.state == "failed":
            print(_failed_text(n))
    return 0


def _failed_text(n: Any) -> str:
    """Why a node is down for good (the supervisor gave up, or its policy says not to restart
    it): how it ended and the last thing it logged, which is most often the reason."""
    last = log_tail(Path(n.log_path), 1) if n.log_path else ""
    said = f": {last}" if last and not last.startswith(START_MARK) else ""
    return f"{n.name}: failed ({n.last_error or 'not running'}){said}; `nbdfabric logs {n.name}`"


def cmd_logs(argv: Sequence[str]) -> int:
    p = _parser("logs", "Show a node's log (stderr), or the supervisor's without NODE.")
    p.add_argument("node", nargs="?")
    p.add_argument("--follow", "-F", action="store_true", help="keep printing what is appended")
    p.add_argument("--tail", "-n", type=whole(0), metavar="N", help="only the last N lines")
    p.add_argument("--events", action="store_true", help="stream supervisor events (gRPC)")
    args = p.parse_args(argv)
    found = _find_fabric("logs", args)
    if found is None:
        return 1
    name, run = found
    if args.events:
        return _events(name, run, args.follow)
    path = run.log(args.node) if args.node else run.supervisor_log
    if not path.exists():
        _err("logs", f"no log at {path}")
        return 1
    with path.open("r", errors="replace") as f:
        text = f.read()
        if args.tail is not None:  # [-0:] would be every line
            lines = text.splitlines(keepends=True)
            text = "".join(lines[len(lines) - min(args.tail, len(lines)) :])
        sys.stdout.write(text)
        sys.stdout.flush()
        while args.follow:
            chunk = f.read()
            if chunk:
                sys.stdout.write(chunk)
                sys.stdout.flush()
            else:
                time.sleep(0.2)
    return 0


def _events(
    name: str,
    run: RunDir,
    follow: bool,
    replay: bool = True,
    as_json: bool = False,
    command: str = "logs",
) -> int:
    from .events import Event

    client = connect(run)
    if client is None:
        _err(command, f"fabric {name} is not running")
        return NOT_RUNNING
    stream = client.stub.WatchFabricEvents(
        client.pb.WatchFabricEventsRequest(replay=replay, follow=follow)
    )
    try:
        for ev in stream:
            if as_json:
                line = json.dumps(
                    {"time": ev.time, "node": ev.node, "kind": ev.kind, "message": ev.message}
                )
            else:
                line = str(Event(ev.time, ev.node, ev.kind, ev.message))
            print(line, flush=True)
    except grpc.RpcError as exc:
        # UNAVAILABLE: the supervisor went away (`down`): the stream is over.
        if exc.code() not in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE):  # type: ignore[attr-defined]
            _err(command, _rpc_error(exc))
            return 1
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
    return 0


def cmd_events(argv: Sequence[str]) -> int:
    p = _parser("events", "Stream the supervisor's events (started, healthy, exited, "
                "restarted, members, ...) until Ctrl-C or `down`.")  # fmt: skip
    p.add_argument("--no-follow", action="store_true", help="print what is remembered, then exit")
    p.add_argument("--no-replay", action="store_true", help="only events from now on")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    args = p.parse_args(argv)
    found = _find_fabric("events", args)
    if found is None:
        return 1
    name, run = found
    return _events(name, run, not args.no_follow, not args.no_replay, args.json, "events")


def cmd_set(argv: Sequence[str]) -> int:
    p = _parser("set", "Change live params of a running node (gRPC Configure).")
    p.add_argument("node")
    p.add_argument("changes", nargs="+", metavar="KEY=VALUE")
    args = p.parse_args(argv)
    from nodes.control.cli import parse_changes

    try:
        changes = parse_changes(args.changes)
    except ValueError as exc:  # usage, as for `ctl ADDR set`
        _err("set", str(exc))
        return 2
    found = _find_fabric("set", args)
    if found is None:
        return 1
    name, run = found
    client = connect(run)
    if client is None:
        _err("set", f"fabric {name} is not running")
        return 1
    try:
        client.stub.ConfigureNode(client.pb.ConfigureNodeRequest(node=args.node, changes=changes))
    except grpc.RpcError as exc:
        _err("set", _rpc_error(exc))
        return 1
    finally:
        client.close()
    print(f"{args.node}: " + ", ".join(f"{k}={v}" for k, v in changes.items()))
    return 0


_OPERATE_HELP = {
    "stop": "Stop nodes of a running fabric (dependents first); they stay stopped until "
    "`start`, `restart` or `up` (as docker compose stop).",
    "start": "Start stopped or failed nodes of a running fabric (upstreams first).",
    "restart": "Restart nodes of a running fabric (upstreams first), as a crash would: a fan "
    "keeps its member states.",
}


def cmd_operate(command: str) -> Callable[[Sequence[str]], int]:
    """`nbdfabric stop|start|restart NODE...`: OrchestratorService.{Stop,Start,Restart}Nodes."""

    def run(argv: Sequence[str]) -> int:
        p = _parser(command, _OPERATE_HELP[command])
        p.add_argument("nodes", nargs="+", metavar="NODE")
        args = p.parse_args(argv)
        found = _find_fabric(command, args)
        if found is None:
            return 1
        name, run = found
        client = connect(run)
        if client is None:
            _err(command, f"fabric {name} is not running")
            return 1
        method = f"{command.capitalize()}Nodes"
        request = getattr(client.pb, f"{method}Request")(nodes=args.nodes)
        try:
            reply = getattr(client.stub, method)(request)
        except grpc.RpcError as exc:
            _err(command, _rpc_error(exc))
            return 1
        finally:
            client.close()
        if command == "stop":
            done = [f"{n}: stopped" for n in reply.stopped]
        else:
            nodes = reply.started if command == "start" else reply.restarted
            whom = [f"pid {n.pid}" if n.pid else f"container {n.container_id}" for n in nodes]
            done = [f"{n.name}: {command}ed ({w})" for n, w in zip(nodes, whom, strict=True)]
        left = sorted(set(args.nodes) - {line.split(":")[0] for line in done})
        for line in done:
            print(line)
        for node in left:
            print(f"{node}: already {'stopped' if command == 'stop' else 'running'}")
        return 0

    return run


# -- pure commands ------------------------------------------------------------------------------


def cmd_validate(argv: Sequence[str]) -> int:
    p = _parser("validate", "Check a topology file; print every problem with its line.", True)
    args = p.parse_args(argv)
    path = _file(args)
    topology = load_or_report(path)
    if topology is None:
        return 1
    print(f"{path}: ok: fabric {topology.name}, {len(topology.nodes)} nodes, "
          f"{len(topology.exports)} export{'' if len(topology.exports) == 1 else 's'}")  # fmt: skip
    return 0


def cmd_graph(argv: Sequence[str]) -> int:
    from .graph import dot, text_tree

    p = _parser("graph", "Draw a topology: a text tree, or Graphviz with --dot.", True)
    p.add_argument("--dot", action="store_true")
    args = p.parse_args(argv)
    topology = load_or_report(_file(args))
    if topology is None:
        return 1
    print(dot(topology) if args.dot else text_tree(topology))
    return 0


def cmd_schema(argv: Sequence[str]) -> int:
    from .topology import json_schema

    argparse.ArgumentParser(
        prog="nbdfabric schema", description="Print the topology file's JSON Schema."
    ).parse_args(argv)
    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_module(command: str) -> Callable[[Sequence[str]], int]:
    """`compose` and `k8s` live in their own modules (orchestrator/compose.py, k8s.py)."""

    def run(argv: Sequence[str]) -> int:
        import importlib

        try:
            module = importlib.import_module(f"orchestrator.{command}")
        except ImportError:
            _err(command, "not available yet in this build")
            return 2
        return int(module.main(argv))

    return run


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "up": cmd_up,
    "down": cmd_down,
    "status": cmd_status,
    "logs": cmd_logs,
    "events": cmd_events,
    "set": cmd_set,
    "stop": cmd_operate("stop"),
    "start": cmd_operate("start"),
    "restart": cmd_operate("restart"),
    "validate": cmd_validate,
    "graph": cmd_graph,
    "schema": cmd_schema,
    "compose": cmd_module("compose"),
    "k8s": cmd_module("k8s"),
}


def main(command: str, argv: Sequence[str]) -> int:
    handler = COMMANDS.get(command)
    if handler is None:
        _err(command, "unknown fabric command")
        return 2
    try:
        return handler(list(argv))
    except KeyboardInterrupt:
        return 130
