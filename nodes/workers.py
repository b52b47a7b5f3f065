"""`nbdfabric node KIND --workers N`: N processes serve one export, on as many cores.

One event loop serves every connection of a node on one core. A client that opens several
connections (nbdcopy opens four when the server offers multi-conn; qemu's several queues) then
keeps only that core busy, where nbdkit spreads the same work over threads. With --workers the
node process becomes a small supervisor: it opens the listening sockets, moves the backend's
state where other processes can see it (the memory node's pages into a shared mapping), and forks
N workers. Every worker accepts on the same sockets, so the kernel spreads connections over them,
and each runs its own event loop.

- Only kinds whose state can live outside one process take it (`shareable` in their class: the
  memory, null, zero, full, pattern and file plugins, the nbd proxy): a cow overlay or a cache in
  one process's memory cannot be split.
- The supervisor writes the ready file and prints the URI once every worker serves, runs --run,
  passes the stop signals (run.STOP_SIGNALS) on, and exits after the workers with the first
  non-zero status. A worker that dies while the node serves is replaced (its connections are
  lost; a memory node's data is not: it lives in the shared mapping). A worker dies with its
  supervisor (PR_SET_PDEATHSIG), so none outlives a kill -9.
- With --control or --metrics, each worker serves its own NodeService on a private unix socket,
  and one more child, the control process, serves the node's addresses and answers for all the
  workers together (control/fanin.py). It starts once the workers serve, is replaced if it dies,
  and is stopped after the last worker. A worker that exits 0 was told to shut down (a Shutdown
  through the control endpoint reaches every worker): the node then stops instead of replacing it.
- TLS works: each worker builds its context from the same files.
- Limits are per worker: --max-connections counts one worker's connections.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from . import registry
from .base import Backend
from .run import (
    NOT_ROOT,
    NodeSpec,
    SpecError,
    build_backend,
    die_with,
    event_loop_runner,
    listen_addresses,
    serve,
    stop_signals,
    write_ready_file,
)
from .server.addresses import (
    UNIX_PATH_MAX,
    bound_address,
    open_listener,
    remove_socket_file,
    systemd_sockets,
)
from .server.node import export_uris

log = logging.getLogger("nbdfabric.node")

#: A worker that dies this many times within RESTART_WINDOW seconds is not replaced again.
MAX_RESTARTS = 5
RESTART_WINDOW = 10.0


def run_workers(spec: NodeSpec) -> int:
    cls = registry.get(spec.kind)
    if not cls.shareable:
        raise SpecError(
            f"--workers: {spec.kind} keeps its state in one process, so it cannot be served by "
            "several (kinds that can: " + ", ".join(shareable_kinds()) + ")"
        )
    backend = build_backend(spec)
    backend.share()
    sockets = systemd_sockets()
    sockets += [open_listener(addr) for addr in listen_addresses(spec, sockets)]
    return Supervisor(spec, backend, sockets).run()


def shareable_kinds() -> list[str]:
    return sorted(kind for kind in registry.kinds() if registry.get(kind).shareable)


class Supervisor:
    """The node process under --workers: no event loop, only forks, signals and waits."""

    def __init__(self, spec: NodeSpec, backend: Backend, sockets: list[socket.socket]) -> None:
        self.spec = spec
        self.backend = backend
        self.sockets = sockets
        self.workers: dict[int, int] = {}  #: pid -> slot (a replacement takes the dead one's)
        self.stopping = False
        self.status = 0
        self.started = time.time()
        self._deaths: list[float] = []  #: when workers died unasked, for the restart limit
        #: With --control/--metrics: the workers' private control sockets, the control
        #: process, and the addresses it serves (its replacement serves the same).
        self.control_dir = _private_dir(spec.workers) if spec.control or spec.metrics else None
        self.control_pid: int | None = None
        self.bound: dict[str, str | None] = {"control": spec.control, "metrics": spec.metrics}
        #: What stops the node, passed on to the workers (run.STOP_SIGNALS).
        self.signals = set(stop_signals())

    def run(self) -> int:
        for sig in self.signals:
            signal.signal(sig, self._on_signal)
        try:
            self._give_to_user()
            ready = [self._spawn(slot) for slot in range(self.spec.workers)]
            for fd in ready:
                _wait_ready(fd)
            if self.control_dir is not None:
                self._start_control()
        except SpecError:
            asked = self.stopping  # told to stop while the workers were starting: not a failure
            self._stop(signal.SIGTERM)
            self._stop_control()
            self._reap_all()
            self._remove_socket_files()
            if asked:
                return 0
            raise
        uris = self._uris()
        if self.spec.print_uri:
            print(uris[0], flush=True)
        if self.spec.ready_file:
            write_ready_file(self.spec.ready_file, self._ready_info(uris))
        log.info("%s serving on %s with %d workers", self.spec.kind, uris[0], len(self.workers))
        command = None
        if self.spec.run:
            env = dict(os.environ, uri=uris[0])
            if self.bound["control"]:
                env["control"] = self.bound["control"]  # as a single-process node sets it
            as_user = {} if self.spec.run_as is None else self.spec.run_as.popen_args()
            command = subprocess.Popen(self.spec.run, shell=True, env=env, **as_user)
        self._supervise(command)
        self._remove_socket_files()
        return self.status

    def _give_to_user(self) -> None:
        """-u/-g: the workers and the control process become the user once they have made
        their sockets; the supervisor, which serves no client, stays who it is, to fork their
        replacements and to remove the socket files at the end (nginx's master and workers).
        What they share becomes the user's first: the listening unix sockets (so the user can
        connect) and the directory of the workers' control sockets."""
        run_as = self.spec.run_as
        if run_as is None:
            return
        paths = [a.path for a in map(bound_address, self.sockets) if a.kind == "unix"]
        if self.control_dir is not None:
            paths.append(self.control_dir)
        try:
            run_as.give(paths)
        except PermissionError:
            raise SpecError(NOT_ROOT) from None

    # Workers -------------------------------------------------------------------------------

    def _spawn(self, slot: int) -> int:
        """Fork one worker; returns the read end of the pipe on which it says it serves."""
        spec = self.spec
        if self.control_dir is not None:  # its own control endpoint, for the control process
            spec = dataclasses.replace(spec, control=self._worker_control(slot), metrics=None)
        return self._fork(
            lambda ready_w: event_loop_runner()(
                serve(spec, backend=self.backend, sockets=self.sockets, ready_fd=ready_w)
            ),
            slot,
        )

    def _worker_control(self, slot: int) -> str:  # keep in step with _private_dir
        return f"unix:{self.control_dir}/worker{slot}.sock"

    def _fork(self, main: Any, slot: int | None) -> int:
        """Fork a child that runs `main(ready_w)`: a worker in `slot`, or (None) the control
        process. Returns the read end of the pipe on which it says it is ready."""
        ready_r, ready_w = os.pipe()
        parent = os.getpid()
        # No signal between fork and the child's own handlers: ours would act on its copy.
        signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)
            os.close(ready_r)
            os.close(ready_w)
            raise
        if pid == 0:
            os.close(ready_r)
            code = 1
            try:
                for sig in self.signals:
                    signal.signal(sig, signal.SIG_DFL)  # the worker's loop installs its own
                signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)
                _die_with(parent)
                code = main(ready_w)
            except BaseException as exc:  # whatever happens, the child ends here
                what = "worker" if slot is not None else "control"
                print(f"nbdfabric node {self.spec.kind}: {what}: {exc}", file=sys.stderr)
            finally:
                os._exit(code)
        if slot is None:
            self.control_pid = pid
        else:
            self.workers[pid] = slot
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)
        os.close(ready_w)
        return ready_r

    def _start_control(self) -> None:
        """Fork the control process (control/fanin.py) and learn the addresses it serves."""
        spec, bound = self.spec, self.bound
        paths = [self._worker_control(slot).removeprefix("unix:") for slot in range(spec.workers)]
        node_pid = os.getpid()

        def main(ready_w: int) -> int:
            from .control.fanin import serve_fanin

            return int(
                event_loop_runner()(
                    serve_fanin(
                        paths,
                        run_as=spec.run_as,
                        node_pid=node_pid,
                        started=self.started,
                        export_name=spec.options.export_name,
                        node_name=spec.name or spec.kind,
                        control=bound["control"],
                        metrics=bound["metrics"],
                        reflection=spec.reflection,
                        ready_fd=ready_w,
                    )
                )
            )

        with os.fdopen(self._fork(main, None), "rb") as pipe:
            said = pipe.read()
        if not said:
            raise SpecError("--workers: the control process exited before it could serve")
        self.bound = json.loads(said)

    def _stop_control(self) -> None:
        if self.control_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.control_pid, signal.SIGTERM)

    def _supervise(self, command: subprocess.Popen[bytes] | None) -> None:
        """Wait for children until every worker is gone, then the control process (and the
        --run command, if any)."""
        while self.workers or command is not None or self.control_pid is not None:
            try:
                pid, raw = os.wait()  # a signal runs its handler and the wait goes on (PEP 475)
            except ChildProcessError:
                break
            code = os.waitstatus_to_exitcode(raw)
            code = 128 - code if code < 0 else code
            if command is not None and pid == command.pid:
                command.returncode = code
                command = None
                self.status = self.status or code
                self._stop(signal.SIGTERM)  # captive mode: the node ends with the command
                continue
            if pid == self.control_pid:
                self.control_pid = None
                if not self.stopping:
                    self._replace(pid, code, None)
                continue
            slot = self.workers.pop(pid, None)
            if slot is None:
                continue
            if not self.stopping and code == 0:
                log.info("worker %d was told to shut down: stopping the node", pid)
                self._stop(signal.SIGTERM)
            if self.stopping:
                if code and not self.status:
                    log.warning("worker %d exited with status %d", pid, code)
                    self.status = code
                if not self.workers:
                    self._stop_control()  # it answered for the workers until the last one left
            else:
                self._replace(pid, code, slot)
        if command is not None:
            command.terminate()
            command.wait()

    def _replace(self, pid: int, code: int, slot: int | None) -> None:
        """Start another worker in `slot`, or (None) another control process."""
        what = "worker" if slot is not None else "the control process"
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < RESTART_WINDOW] + [now]
        if len(self._deaths) > MAX_RESTARTS:
            log.error("children keep dying (last: %s %d, status %d): stopping the node",
                      what, pid, code)  # fmt: skip
            self.status = 1
            self._stop(signal.SIGTERM)
            return
        log.warning("%s %d exited with status %d: starting another", what, pid, code)
        try:
            if slot is None:
                self._start_control()
            else:
                _wait_ready(self._spawn(slot))
        except SpecError as exc:
            log.error("%s", exc)  # the next wait() reaps it and counts it

    def _on_signal(self, sig: int, frame: Any) -> None:
        self._stop(sig)

    def _stop(self, sig: int) -> None:
        """Stop the workers; the control process follows the last of them (_supervise)."""
        self.stopping = True
        for pid in list(self.workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if not self.workers:
            self._stop_control()

    def _reap_all(self) -> None:
        for pid in [*self.workers, *([self.control_pid] if self.control_pid else [])]:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.workers.clear()
        self.control_pid = None

    # Reporting -----------------------------------------------------------------------------

    def _uris(self) -> list[str]:
        return export_uris([bound_address(s) for s in self.sockets], self.spec.options)

    def _ready_info(self, uris: list[str]) -> dict[str, Any]:
        return {
            "uri": uris[0],
            "uris": uris,
            "control": self.bound["control"],
            "metrics": self.bound["metrics"],
            "pid": os.getpid(),
            "kind": self.spec.kind,
            "workers": sorted(self.workers),
        }

    def _remove_socket_files(self) -> None:
        for sock in self.sockets:
            addr = bound_address(sock)
            sock.close()
            remove_socket_file(addr)
        if self.spec.run_as is not None:  # the control process, as the user, may not remove
            # its own from a directory that is not the user's
            for bound in self.bound.values():
                if bound and bound.startswith("unix:"):
                    with contextlib.suppress(OSError):
                        os.unlink(bound.removeprefix("unix:"))
        if self.control_dir is not None:
            shutil.rmtree(self.control_dir, ignore_errors=True)


def _private_dir(workers: int) -> str:
    """A new 0700 directory for the workers' control sockets: in $TMPDIR, or in /tmp when
    $TMPDIR is too deep for a socket path in it to fit in a sockaddr_un."""
    prefix = "nbdfabric-node-"
    longest = len(f"/{prefix}XXXXXXXX/worker{workers - 1}.sock")
    base = tempfile.gettempdir()
    if len(os.fsencode(base)) + longest > UNIX_PATH_MAX:
        base = "/tmp"
    return tempfile.mkdtemp(prefix=prefix, dir=base)


def _wait_ready(fd: int) -> None:
    """Block until a worker says it serves (one byte); SpecError if it died first."""
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        if not pipe.read(1):
            raise SpecError("--workers: a worker exited before it could serve (see above)")


def _die_with(parent: int) -> None:
    if not die_with(parent):  # the parent died before prctl took effect
        os._exit(1)
