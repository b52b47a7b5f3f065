"""Commands a node runs (`--run`, exitwhen's and exportname's scripts), started without fork().

uvloop starts subprocesses with fork() (libuv's uv_spawn), and a fork in a node that serves gRPC
(`--control`) runs gRPC's fork handlers, which log "Other threads are currently calling into
gRPC, skipping fork() handlers" on stderr at every command. subprocess.Popen starts them with
vfork(), which runs no fork handlers (the child only execs), and the node awaits the exit on a
pidfd in its event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL


def nbdfabric_command() -> list[str]:
    """The command that runs nbdfabric itself (to start nodes: `nbdfabric chain`, the
    orchestrator's process backend): the console script beside this Python, else the module."""
    script = Path(sys.executable).parent / "nbdfabric"
    return [str(script)] if script.exists() else [sys.executable, "-m", "nodes.cli"]


class Child:
    """A command started by shell(): asyncio's Process, for what nodes use of it."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.stdout: asyncio.StreamReader | None = None
        self._pipe: asyncio.BaseTransport | None = None
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[None] = loop.create_future()
        try:
            pidfd = os.pidfd_open(popen.pid)
        except OSError:  # Linux before 5.3: a thread waits instead
            waiting = loop.run_in_executor(None, popen.wait)
            waiting.add_done_callback(lambda _: self._set_exited())
        else:
            loop.add_reader(pidfd, self._reap, pidfd)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """As asyncio's: -N when signal N killed it."""
        return self.popen.returncode

    def _reap(self, pidfd: int) -> None:
        asyncio.get_running_loop().remove_reader(pidfd)
        os.close(pidfd)
        self.popen.wait()  # it has exited: this reaps it at once
        self._set_exited()

    def _set_exited(self) -> None:
        if not self._exited.done():
            self._exited.set_result(None)

    async def wait(self) -> int:
        """Its exit status, once it has exited; its stdout pipe is closed then."""
        await asyncio.shield(self._exited)
        if self._pipe is not None:
            self._pipe.close()
        assert self.popen.returncode is not None
        return self.popen.returncode

    def terminate(self) -> None:
        self.popen.terminate()  # nothing once it has been reaped (no other pid's signal)

    def kill(self) -> None:
        self.popen.kill()

    def kill_group(self) -> None:
        """SIGKILL to its process group (one started with new_session=True): the shell and
        what it started. Only before it is reaped: until then its pid, the group's id, is
        nobody else's."""
        if self.popen.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)


async def shell(
    command: str,
    *,
    env: dict[str, str] | None = None,
    stdin: int | IO[Any] | None = None,
    stdout: int | IO[Any] | None = None,
    new_session: bool = False,
) -> Child:
    """Run `command` through /bin/sh, as asyncio.create_subprocess_shell; stdout=PIPE gives
    the Child a StreamReader. `new_session`: in a session (and process group) of its own, so
    that kill_group() ends what the script started too."""
    # In the loop, as asyncio's default loop does it too: Popen returns once the child execs.
    popen = subprocess.Popen(  # noqa: ASYNC220
        command, shell=True, env=env, stdin=stdin, stdout=stdout, start_new_session=new_session
    )
    child = Child(popen)
    if popen.stdout is not None:
        reader = child.stdout = asyncio.StreamReader()
        try:
            child._pipe, _ = await asyncio.get_running_loop().connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), popen.stdout
            )
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                popen.kill()
            await child.wait()
            popen.stdout.close()
            raise
    return child


# Commands whose output is the answer (the sh and eval plugins' scripts) ---------------------

#: What is kept of a command's stderr (the rest is read and dropped: a full pipe would stop it).
STDERR_KEPT = 64 * 1024


@dataclass
class Captured:
    """How a command run by run_captured() ended."""

    #: Its exit status; -N when signal N ended it (SIGKILL when it was killed below).
    status: int
    #: What it wrote on stdout (empty when it went `into` a buffer), up to the limit.
    stdout: bytes
    #: How many bytes it wrote on stdout (more than the limit only when it was over).
    written: int
    #: The first STDERR_KEPT bytes it wrote on stderr.
    stderr: bytes
    #: It did not finish (its stdout and stderr closed) `within` the time given: killed.
    timed_out: bool = False
    #: It wrote more than the limit on stdout with `kill_over`: killed.
    over: bool = False


class _Output(asyncio.Protocol):
    """One of a command's output pipes: its bytes kept (or put `into` a buffer) up to `limit`,
    the rest counted and dropped, or `over()` told once it goes past the limit."""

    def __init__(self, limit: int, into: memoryview | None = None, over: Any = None) -> None:
        self.limit, self.into, self.over = limit, into, over
        self.chunks: list[bytes] = []
        self.count = 0
        self.closed = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        room = self.limit - self.count
        if room > 0:
            piece = data[:room]
            if self.into is not None:
                self.into[self.count : self.count + len(piece)] = piece
            else:
                self.chunks.append(piece)
        was_over = self.count > self.limit
        self.count += len(data)
        if self.count > self.limit and not was_over and self.over is not None:
            self.over()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class _Input(asyncio.Protocol):
    """A command's stdin: written to once, then closed (a command that does not read it all
    breaks the pipe, which is no error: nbdkit ignores that too)."""

    def connection_lost(self, exc: Exception | None) -> None:
        pass


def _seen(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def run_captured(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    data: Any = None,
    into: memoryview | None = None,
    limit: int = 1 << 20,
    kill_over: bool = False,
    within: float | None = None,
) -> Captured:
    """Run `argv` (no shell) in a process group of its own, `data` (bytes-like) on its stdin
    (else /dev/null), its stdout kept up to `limit` bytes (or written `into` that buffer, whose
    length is then the limit), its stderr kept as Captured.stderr says. The event loop goes on
    serving meanwhile. It is killed, its process group with it, when it goes over the limit
    with `kill_over`, when it has not finished `within` that many seconds, or when the caller is
    cancelled. OSError if it cannot be started (no such file, not executable)."""
    if into is not None:
        limit = len(into)
    popen = subprocess.Popen(  # noqa: ASYNC220 (vfork + exec: returns once the child execs)
        argv,
        env=env,
        stdin=PIPE if data is not None else DEVNULL,
        stdout=PIPE,
        stderr=PIPE,
        process_group=0,
    )
    child = Child(popen)
    loop = asyncio.get_running_loop()
    readers: list[asyncio.BaseTransport] = []
    writer: asyncio.WriteTransport | None = None

    def kill() -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, signal.SIGKILL)

    out = _Output(limit, into, kill if kill_over else None)
    err = _Output(STDERR_KEPT)
    timed_out = False
    #: The pipes no transport has taken yet (a transport closes its own, later: closing it
    #: here as well closed an fd number libuv was about to close, and it aborted the node).
    unowned = [f for f in (popen.stdin, popen.stdout, popen.stderr) if f is not None]
    try:
        assert popen.stdout is not None and popen.stderr is not None
        for pipe, protocol in ((popen.stdout, out), (popen.stderr, err)):
            reader, _ = await loop.connect_read_pipe(lambda p=protocol: p, pipe)  # type: ignore[misc]
            readers.append(reader)
            unowned.remove(pipe)
        if data is not None:
            assert popen.stdin is not None
            writer, _ = await loop.connect_write_pipe(_Input, popen.stdin)
            unowned.remove(popen.stdin)
            if len(data):
                writer.write(data)
            writer.close()  # once what was written has gone (or the pipe broke)
        try:
            # wait_for, not asyncio.timeout(): a request's coroutine may run without a Task
            # (nodes/server/eager.py).
            finished = asyncio.gather(child.wait(), out.closed, err.closed)
            finished.add_done_callback(_seen)  # cancelled with its caller: nothing to report
            await asyncio.wait_for(finished, within)
        except TimeoutError:
            timed_out = True
            kill()
            await child.wait()
    except BaseException:
        kill()  # cancelled, or the pipes could not be watched: reaped by Child in any case
        raise
    finally:
        for transport in readers:
            transport.close()
        if writer is not None:
            writer.abort()  # what it did not read goes: the caller's buffer is theirs again
        for file in unowned:
            file.close()
    return Captured(
        status=child.returncode if child.returncode is not None else -signal.SIGKILL,
        stdout=b"".join(out.chunks),
        written=out.count,
        stderr=b"".join(err.chunks),
        timed_out=timed_out,
        over=kill_over and out.count > limit,
    )
