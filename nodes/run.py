"""Running one node process: build the backend, listen, report readiness, serve until told to
stop (signal, gRPC shutdown, or the end of a `--run` command), then exit cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import stat
import sys
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from . import registry
from .base import Backend, StopNode
from .params import Params
from .server.addresses import Address, repeated_export, same_export_problem, systemd_sockets
from .server.node import NodeOptions, NodeRuntime

log = logging.getLogger("nbdfabric.node")


@dataclass
class UpstreamOptions:
    tls_certificates: str | None = None
    tls_verify: bool = True
    connect_timeout: float = 30.0


@dataclass
class NodeSpec:
    """Everything `nbdfabric node` was told, already parsed and validated."""

    kind: str
    params: Params
    upstreams: list[str] = field(default_factory=list)
    listen: list[Address] = field(default_factory=list)
    options: NodeOptions = field(default_factory=NodeOptions)
    upstream_options: UpstreamOptions = field(default_factory=UpstreamOptions)
    control: str | None = None
    reflection: bool = True
    metrics: str | None = None
    print_uri: bool = False
    ready_file: str | None = None
    run: str | None = None
    name: str = ""
    workers: int = 1  #: processes serving the export (workers.py)
    #: -s: serve the one client connected on stdin/stdout (a socket), then exit (nbdkit -s).
    single: bool = False
    #: The parent's pid (as seen at start): exit (SIGTERM) when it dies (nbdkit's
    #: --exit-with-parent; Linux); 0: no.
    exit_with_parent: int = 0
    #: -P: write the pid here once the node serves (nbdkit's --pidfile; left at exit, as its).
    pidfile: str | None = None
    #: -u/-g: the user and group to run as once the sockets are bound and the backend open
    #: (nbdkit's --user/--group), as (name, uid, gid); None: stay who we are.
    run_as: RunAs | None = None


#: What -u/-g say when the node may not change its user or group.
NOT_ROOT = "-u/-g: only a node started as root can change its user or group"


@dataclass(frozen=True)
class RunAs:
    """Who a node becomes after binding its sockets and opening its backend (-u/-g)."""

    user: str | None  #: its supplementary groups are the user's (initgroups); None: none
    uid: int | None
    gid: int | None

    def give(self, paths: Sequence[str]) -> None:
        """Make `paths` (unix sockets, a directory of them) the user's and group's."""
        for path in paths:
            os.chown(path, -1 if self.uid is None else self.uid, -1 if self.gid is None
                     else self.gid)  # fmt: skip

    def become(self, sockets: Sequence[str] = ()) -> None:
        """setgroups/setgid/setuid, in that order (after setuid nothing else can change); the
        unix `sockets` it made become its own first, so that it can remove them at exit and
        its user can connect (nbdkit leaves them root's)."""
        try:
            self.give(sockets)
            if self.gid is not None:
                if self.user is not None:
                    os.initgroups(self.user, self.gid)
                else:
                    os.setgroups([])
                os.setgid(self.gid)
            if self.uid is not None:
                os.setuid(self.uid)
        except PermissionError:
            raise OSError(errno.EPERM, NOT_ROOT) from None

    def popen_args(self) -> dict[str, Any]:
        """subprocess.Popen's arguments that start a command as become() makes the node: the
        user, the group, and the user's groups (none without a user)."""
        gid = os.getgid() if self.gid is None else self.gid
        groups = os.getgrouplist(self.user, gid) if self.user is not None else []
        return {"user": self.uid, "group": self.gid, "extra_groups": groups}


class SpecError(ValueError):
    pass


def build_backend(spec: NodeSpec) -> Backend:
    cls = registry.get(spec.kind)
    role = cls.role
    if role == "plugin":
        if spec.upstreams:
            raise SpecError(f"{spec.kind} is a plugin: it takes no --upstream")
        return cls.create(spec.params)
    from .upstream import Upstream

    uo = spec.upstream_options

    def upstream(uri: str, index: int) -> Upstream:
        return Upstream(
            uri,
            name=f"{spec.name or spec.kind}/upstream{index}",
            tls_certificates=uo.tls_certificates,
            tls_verify=uo.tls_verify,
            connect_timeout=uo.connect_timeout,
        )

    if role == "filter":
        if len(spec.upstreams) != 1:
            raise SpecError(f"{spec.kind} is a filter: give exactly one --upstream URI")
        up = upstream(spec.upstreams[0], 0)
        up.all_contexts = getattr(cls, "passes_contexts", False)
        return cls(spec.params, up)  # type: ignore[call-arg]
    if len(spec.upstreams) < cls.min_members:
        raise SpecError(
            f"{spec.kind} is a fan: give at least {cls.min_members} --upstream URIs "
            f"(got {len(spec.upstreams)})"
        )
    # Checked before any connection: the same export twice, a stripe's chunks of two members
    # would overwrite each other's, a mirror's two copies would be one (mdadm refuses too).
    twice = repeated_export(spec.upstreams)
    if twice is not None:
        i, j = twice
        raise SpecError(same_export_problem(i, spec.upstreams[i], j, spec.upstreams[j]))
    members = [upstream(u, i) for i, u in enumerate(spec.upstreams)]
    return cls(spec.params, members)  # type: ignore[call-arg]


def write_ready_file(path: str, info: dict[str, Any]) -> None:
    _write_whole(path, json.dumps(info), "--ready-file")


def write_pidfile(path: str) -> None:
    _write_whole(path, f"{os.getpid()}\n", "--pidfile")


def _write_whole(path: str, text: str, option: str) -> None:
    """`text` into `path`, replacing what is there: readers never see half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:  # the message named the temporary file, not the option
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise OSError(exc.errno, f"{option} {path}: {exc.strerror}") from None


async def serve(
    spec: NodeSpec,
    *,
    backend: Backend | None = None,
    sockets: list[socket.socket] | None = None,
    ready_fd: int | None = None,
) -> int:
    """Serve until told to stop. A --workers worker (workers.py) gets its backend and listening
    sockets ready-made, says on `ready_fd` when it serves, and reports nothing else."""
    from .server.poll import POLLER

    # From here a stop signal is held until the node serves, then acted on: its default action
    # ended a node that had bound its unix sockets, and left their files behind.
    stop_asked = _hold_stop_signals()
    POLLER.configure(spec.options.poll_max_us)  # before any socket: they register with it
    runtime = NodeRuntime(backend or build_backend(spec), spec.options)
    if sockets is not None:
        runtime.owns_paths = False  # the supervisor removes unix sockets at the end
        await runtime.start(sockets, [])
        return await _serve_as_worker(spec, runtime, ready_fd, stop_asked)
    single = take_stdin_socket() if spec.single else None
    found = [] if single is not None else systemd_sockets()
    control_addr = metrics_addr = None
    control_server = None
    try:
        await runtime.start(found, [] if single is not None else listen_addresses(spec, found))

        if spec.control:
            from .control.server import start_control

            control_server, control_addr = await start_control(
                runtime, spec.control, reflection=spec.reflection
            )
        if spec.metrics:
            from .control.metrics import start_metrics

            metrics_addr = start_metrics(runtime, spec.metrics, node_name=spec.name or spec.kind)

        uris = runtime.uris() if single is None else ["nbd+unix:///?socket=/dev/stdin"]
        if spec.pidfile:
            write_pidfile(spec.pidfile)
        if spec.ready_file:
            write_ready_file(
                spec.ready_file,
                {
                    "uri": uris[0],
                    "uris": uris,
                    "control": control_addr,
                    "metrics": metrics_addr,
                    "pid": os.getpid(),
                    "kind": spec.kind,
                },
            )
        if spec.run_as is not None:  # sockets bound, backend open, files above written
            owned = [a.path for a in runtime.addresses if a.kind == "unix"]
            owned += runtime.backend.sockets()
            if control_addr and control_addr.startswith("unix:"):
                owned.append(control_addr.removeprefix("unix:"))
            spec.run_as.become(owned)
        if spec.print_uri:  # last: a URI printed is one that serves (a wrapper reads it so)
            print(uris[0], flush=True)
    except Exception:
        # Failing after the listeners were bound (a second --listen, --control, --metrics,
        # --ready-file) left their unix socket files behind, and upstream connections open.
        if control_server is not None:
            await control_server.stop(grace=0)
        if metrics_addr is not None:
            from .control.metrics import stop_metrics

            stop_metrics()
        await runtime.shutdown()
        raise
    log.info("%s serving on %s", spec.kind, ", ".join(uris))

    _shutdown_on_signals(runtime, stop_asked)
    if single is not None:
        asyncio.get_running_loop().create_task(runtime.serve_single(single))

    status = 0
    if spec.run:
        env = dict(os.environ, **captive_env(uris[0], spec.options))
        if control_addr:
            env["control"] = control_addr
        from .spawn import shell

        proc = await shell(spec.run, env=env)
        waiter = asyncio.ensure_future(proc.wait())
        stopper = asyncio.ensure_future(runtime.stopped.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if waiter.done():
            status = waiter.result()
            status = 128 - status if status < 0 else status
        else:
            proc.terminate()
            await waiter
            status = 1
        stopper.cancel()
        await runtime.shutdown()
    else:
        await runtime.stopped.wait()
    if control_server is not None:
        await control_server.stop(grace=1.0)
    if metrics_addr is not None:
        from .control.metrics import stop_metrics

        stop_metrics()
    return status


async def _serve_as_worker(
    spec: NodeSpec, runtime: NodeRuntime, ready_fd: int | None, stop_asked: asyncio.Event
) -> int:
    """A --workers worker: its --control is a private socket for the node's control process."""
    control_server = None
    if spec.control:
        from .control.server import start_control

        control_server, _ = await start_control(runtime, spec.control, reflection=False)
    if spec.run_as is not None:  # its control socket made: the control process connects as
        # the user (the supervisor gave the listening sockets before it forked the workers)
        owned = [spec.control.removeprefix("unix:")] if spec.control else []
        spec.run_as.become(owned + runtime.backend.sockets())
    if ready_fd is not None:
        os.write(ready_fd, b"w")
        os.close(ready_fd)
    _shutdown_on_signals(runtime, stop_asked)
    await runtime.stopped.wait()
    if control_server is not None:
        await control_server.stop(grace=1.0)
    return 0


#: The signals that shut a node down cleanly (as SIGTERM: no new clients, requests in flight
#: finish, flush, sockets removed, exit 0): nbdkit's (it catches these four) and qemu-nbd's
#: (HUP, INT, TERM). Their default action ended the process on the spot.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)


def stop_signals() -> list[signal.Signals]:
    """STOP_SIGNALS but SIGHUP when it is ignored already: `nohup nbdfabric node ...` asks to
    outlive the terminal, and nbdkit's handler, which overrides that, ended the node there."""
    return [
        sig
        for sig in STOP_SIGNALS
        if sig != signal.SIGHUP or signal.getsignal(sig) != signal.SIG_IGN
    ]


def captive_env(uri: str, options: NodeOptions) -> dict[str, str]:
    """What nbdkit's captive mode sets for the command: `$uri` (and `$nbd`, its old name), the
    listening `$port` or `$unixsocket` (the other one empty), `$exportname`, and `$tls` (1 for
    on, 2 for require; unset when off)."""
    parts = urllib.parse.urlsplit(uri)
    query = urllib.parse.parse_qs(parts.query)
    env = {
        "uri": uri,
        "nbd": uri,
        "port": "" if parts.port is None else str(parts.port),
        "unixsocket": query.get("socket", [""])[0],
        "exportname": options.export_name,
    }
    if options.tls != "off":
        env["tls"] = "2" if options.tls == "require" else "1"
    return env


def _hold_stop_signals() -> asyncio.Event:
    """While the node starts: a stop signal only sets the event returned."""
    loop, asked = asyncio.get_running_loop(), asyncio.Event()
    for sig in stop_signals():
        loop.add_signal_handler(sig, asked.set)
    return asked


#: Shutdowns under way (the loop keeps only weak references to its tasks).
_SHUTDOWNS: set[asyncio.Task[None]] = set()


def _shutdown_on_signals(runtime: NodeRuntime, asked: asyncio.Event) -> None:
    """Stop signals shut the node down from now on (now, if one came while it started)."""
    loop = asyncio.get_running_loop()

    def shut_down() -> None:
        task = loop.create_task(runtime.shutdown())
        _SHUTDOWNS.add(task)
        task.add_done_callback(_SHUTDOWNS.discard)

    for sig in stop_signals():
        loop.add_signal_handler(sig, shut_down)
    if asked.is_set():
        shut_down()


def take_stdin_socket() -> socket.socket:
    """-s: the client's socket, which libnbd's connect_command (and nbdkit -s users) give as
    stdin and stdout. Both fds are pointed at /dev/null once it is taken: a stray print to
    stdout must not land in the middle of the protocol, and the socket closes with ours."""
    if not stat.S_ISSOCK(os.fstat(0).st_mode):
        raise SpecError("-s serves the client connected on stdin, which must be a socket "
                        "(as libnbd's connect_command gives)")  # fmt: skip
    sock = socket.socket(fileno=os.dup(0))
    sys.stdout.flush()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    return sock


def die_with(parent: int) -> bool:
    """Be sent SIGTERM when process `parent` dies (prctl PR_SET_PDEATHSIG, Linux); False if
    it has died already (before the call took effect: we were handed to another parent)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    return os.getppid() == parent


_PR_SET_PDEATHSIG = 1


def listen_addresses(spec: NodeSpec, found: list[socket.socket]) -> list[Address]:
    """Where to listen: the --listen addresses; with none (and no socket-activated sockets
    `found`), nbdkit's default, 127.0.0.1:10809."""
    if spec.listen or found:
        return spec.listen
    from .server.addresses import parse_address

    return [parse_address("127.0.0.1:10809")]


def run_node(spec: NodeSpec) -> int:
    logging.basicConfig(
        level=os.environ.get("NBDFABRIC_LOG", "WARNING").upper(),
        format=f"%(asctime)s {spec.name or spec.kind}[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        if spec.exit_with_parent and not die_with(spec.exit_with_parent):
            return 1  # the parent is gone already: as if it had died a moment later
        if spec.workers > 1:
            from .workers import run_workers

            return run_workers(spec)
        return event_loop_runner()(serve(spec))
    except StopNode as exc:
        log.info("%s", exc)
        return 0
    except (SpecError, OSError, ValueError) as exc:
        print(f"nbdfabric node {spec.kind}: {describe(exc)}", file=sys.stderr)
        return 1


def describe(exc: BaseException) -> str:
    """An error as a person reads it: `/x: No such file or directory`, not `[Errno 2] ...`."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc)


def event_loop_runner() -> Any:
    """uvloop when it is installed (fewer copies, ~45% more requests/s), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


def parse_addresses(texts: Sequence[str]) -> list[Address]:
    from .server.addresses import parse_address

    return [parse_address(t) for t in texts]
