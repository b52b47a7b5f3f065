"""`nbdfabric node KIND --workers N`: N processes serve one export, on as many cores.

One event loop serves every connection of a node on one core. A client that opens several
connections (nbdcopy opens four when the server offers multi-conn; qemu's several queues) can
then keep only that core busy, where nbdkit spreads the same work over threads. With --workers
the node's first process opens the listening sockets and the backend's shared state (the memory
node's pages move into a shared mapping), then forks N-1 workers; every process accepts on the
same sockets, so the kernel spreads connections over them, and each runs its own loop.

- Only kinds whose state can live outside one process take it (`shareable` in their class: the
  memory, null, zero, full, pattern and file plugins, the nbd proxy): a cow overlay or a cache in
  one process's memory cannot be split.
- The first process writes the ready file and prints the URI once every worker serves, runs
  --run, passes SIGTERM/SIGINT on to the workers, and exits after them with the first non-zero
  status among them. A worker dies with it (PR_SET_PDEATHSIG), so none outlives a kill -9.
- gRPC control and metrics would each see one process's connections and counters, so they are
  refused with --workers for now. TLS works: each process builds its context from the same files.
- Limits are per process: --max-connections counts one worker's connections.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys

from . import registry
from .run import NodeSpec, SpecError, build_backend, event_loop_runner, serve
from .server.addresses import open_listener, parse_address, systemd_sockets

log = logging.getLogger("nbdfabric.node")

_PR_SET_PDEATHSIG = 1


def run_workers(spec: NodeSpec) -> int:
    cls = registry.get(spec.kind)
    if not cls.shareable:
        raise SpecError(
            f"--workers: {spec.kind} keeps its state in one process, so it cannot be served by "
            "several (kinds that can: " + ", ".join(sorted(_shareable_kinds())) + ")"
        )
    if spec.control or spec.metrics:
        raise SpecError(
            "--workers cannot be combined with --control or --metrics yet: each worker process "
            "has its own connections and counters"
        )
    backend = build_backend(spec)
    backend.share()
    sockets = systemd_sockets()
    listen = spec.listen or ([] if sockets else [parse_address("127.0.0.1:10809")])
    sockets += [open_listener(addr) for addr in listen]
    ready_r, ready_w = os.pipe()
    parent = os.getpid()
    workers: list[int] = []
    for _ in range(spec.workers - 1):
        pid = os.fork()
        if (
            pid == 0
        ):  # a worker: serve until told to stop, then leave (never return into our caller)
            os.close(ready_r)
            status = 1
            try:
                _die_with(parent)
                status = event_loop_runner()(
                    serve(spec, backend=backend, sockets=sockets, ready_fd=ready_w)
                )
            except BaseException as exc:  # whatever happens, the worker ends here
                print(f"nbdfabric node {spec.kind}: worker: {exc}", file=sys.stderr)
            finally:
                os._exit(status)
        workers.append(pid)
    os.close(ready_w)
    return event_loop_runner()(
        serve(spec, backend=backend, sockets=sockets, workers=workers, ready_fd=ready_r)
    )


def _die_with(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _shareable_kinds() -> list[str]:
    return [kind for kind in registry.kinds() if registry.get(kind).shareable]


def forward(workers: list[int], sig: int) -> None:
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def wait_ready(fd: int, count: int) -> None:
    """Block until `count` workers said they serve (a byte each); SpecError if one died first."""
    got = 0
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while got < count:
            chunk = pipe.read(count - got)
            if not chunk:
                raise SpecError(f"--workers: {count - got} worker(s) exited before serving")
            got += len(chunk)


def reap(workers: list[int]) -> int:
    """Wait for every worker; the first non-zero exit status among them, else 0."""
    status = 0
    for pid in workers:
        try:
            _, raw = os.waitpid(pid, 0)
        except ChildProcessError:
            continue
        code = os.waitstatus_to_exitcode(raw)
        code = 128 - code if code < 0 else code
        if code and not status:
            log.warning("worker %d exited with status %d", pid, code)
            status = code
    return status
