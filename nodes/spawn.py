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
from typing import IO, Any

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL


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
