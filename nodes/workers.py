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
  passes SIGTERM/SIGINT on, and exits after the workers with the first non-zero status. A
  worker that dies while the node serves is replaced (its connections are lost; a memory node's
  data is not: it lives in the shared mapping). A worker dies with its supervisor
  (PR_SET_PDEATHSIG), so none outlives a kill -9.
- gRPC control and metrics would each see one process's connections and counters, so they are
  refused with --workers for now. TLS works: each worker builds its context from the same files.
- Limits are per worker: --max-connections counts one worker's connections.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from . import registry
from .base import Backend
from .run import (
    NodeSpec,
    SpecError,
    build_backend,
    event_loop_runner,
    listen_addresses,
    serve,
    write_ready_file,
)
from .server.addresses import (
    bound_address,
    open_listener,
    remove_socket_file,
    systemd_sockets,
)
from .server.node import export_uris

log = logging.getLogger("nbdfabric.node")

_PR_SET_PDEATHSIG = 1
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
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
    if spec.control or spec.metrics:
        raise SpecError(
            "--workers cannot be combined with --control or --metrics yet: each worker process "
            "has its own connections and counters"
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
        self.workers: set[int] = set()
        self.stopping = False
        self.status = 0
        self._deaths: list[float] = []  #: when workers died unasked, for the restart limit

    def run(self) -> int:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        try:
            ready = [self._spawn() for _ in range(self.spec.workers)]
            for fd in ready:
                _wait_ready(fd)
        except SpecError:
            asked = self.stopping  # told to stop while the workers were starting: not a failure
            self._stop(signal.SIGTERM)
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
            command = subprocess.Popen(self.spec.run, shell=True, env=dict(os.environ, uri=uris[0]))
        self._supervise(command)
        self._remove_socket_files()
        return self.status

    # Workers -------------------------------------------------------------------------------

    def _spawn(self) -> int:
        """Fork one worker; returns the read end of the pipe on which it says it serves."""
        ready_r, ready_w = os.pipe()
        parent = os.getpid()
        # No signal between fork and the child's own handlers: ours would act on its copy.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
            os.close(ready_r)
            os.close(ready_w)
            raise
        if pid == 0:
            os.close(ready_r)
            code = 1
            try:
                for sig in _STOP_SIGNALS:
                    signal.signal(sig, signal.SIG_DFL)  # the worker's loop installs its own
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
                _die_with(parent)
                code = event_loop_runner()(
                    serve(self.spec, backend=self.backend, sockets=self.sockets, ready_fd=ready_w)
                )
            except BaseException as exc:  # whatever happens, the worker ends here
                print(f"nbdfabric node {self.spec.kind}: worker: {exc}", file=sys.stderr)
            finally:
                os._exit(code)
        self.workers.add(pid)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        os.close(ready_w)
        return ready_r

    def _supervise(self, command: subprocess.Popen[bytes] | None) -> None:
        """Wait for children until every worker is gone (and the --run command, if any)."""
        while self.workers or command is not None:
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
            if pid not in self.workers:
                continue
            self.workers.discard(pid)
            if self.stopping:
                if code and not self.status:
                    log.warning("worker %d exited with status %d", pid, code)
                    self.status = code
            else:
                self._replace(pid, code)
        if command is not None:
            command.terminate()
            command.wait()

    def _replace(self, pid: int, code: int) -> None:
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < RESTART_WINDOW] + [now]
        if len(self._deaths) > MAX_RESTARTS:
            log.error("workers keep dying (last: %d, status %d): stopping the node", pid, code)
            self.status = 1
            self._stop(signal.SIGTERM)
            return
        log.warning("worker %d exited with status %d: starting another", pid, code)
        try:
            _wait_ready(self._spawn())
        except SpecError as exc:
            log.error("%s", exc)  # the next wait() reaps it and counts it

    def _on_signal(self, sig: int, frame: Any) -> None:
        self._stop(sig)

    def _stop(self, sig: int) -> None:
        self.stopping = True
        for pid in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _reap_all(self) -> None:
        for pid in list(self.workers):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.workers.clear()

    # Reporting -----------------------------------------------------------------------------

    def _uris(self) -> list[str]:
        return export_uris([bound_address(s) for s in self.sockets], self.spec.options)

    def _ready_info(self, uris: list[str]) -> dict[str, Any]:
        return {
            "uri": uris[0],
            "uris": uris,
            "control": None,
            "metrics": None,
            "pid": os.getpid(),
            "kind": self.spec.kind,
            "workers": sorted(self.workers),
        }

    def _remove_socket_files(self) -> None:
        for sock in self.sockets:
            addr = bound_address(sock)
            sock.close()
            remove_socket_file(addr)


def _wait_ready(fd: int) -> None:
    """Block until a worker says it serves (one byte); SpecError if it died first."""
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        if not pipe.read(1):
            raise SpecError("--workers: a worker exited before it could serve (see above)")


def _die_with(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
