"""pause: hold requests on a word from a control socket, so that the disk below can be snapshot
while nothing is written to it (nbdkit-pause-filter).

The node listens on the unix socket `pause-control=SOCKET` for one-byte commands, nbdkit's:
- `p` pauses. Requests that arrive from then on wait in this node: they are not passed
  upstream, and they neither fail nor are lost. The reply `P` comes once the requests that
  were in flight before the pause have finished: then nothing this node sent is still being
  done upstream, and a snapshot of the disk below is consistent with what clients were told.
- `r` resumes: the held requests go on, new ones pass at once. The reply is `R`.
- Space, tab and newline are skipped without a reply (`echo p | nc -U SOCKET` gets `P`); any
  other byte gets `X` and is otherwise ignored.
The commands of a connection are done in order, each answered before the next is read (`pr`
gets `PR`, the `R` after the `P`); pausing a paused node or resuming a running one changes
nothing and is answered all the same. A connection takes commands until its client closes it.

It is the node's own pause, the one `nbdfabric ctl ADDR pause` and `ctl ADDR resume` (gRPC
Pause, Resume) steer on every node: a pause by either is lifted by either. `ctl ADDR info`
shows the node's state (paused or serving) and, under status, `pause`: the socket, whether
the node is paused, and how many requests are held. (`ctl pause` also returns only once the
requests in flight have finished; with `--flush` it then flushes, which `p` does not.)

Params: `pause-control=SOCKET` (required; a path, relative to where the node starts). A socket
file already there (left by a node that was killed) is replaced, as nbdkit does; anything else
there is refused (nbdkit deletes a regular file in the way). The node removes it when it stops.

Held requests of a client that goes away: when the node can tell that the client is gone (a
unix socket's client closed it, or a connection was reset), or ends its connection itself (a
protocol error), they are dropped unserved, never passed upstream, and the connection ends at
once, the node still paused. A client that only stopped sending (after
NBD_CMD_DISC, or an end of stream, which over TCP may be a half-close) is still owed replies:
its requests stay held until resume, are then served, and the replies go out if they can (as
nbdkit serves them all on resume). A node told to stop (SIGTERM, `ctl shutdown`) while paused
does what it does with requests in flight: the held requests, which arrived before it was told,
are released and served, then the node flushes and exits (nbdkit 1.32 waits for an `r` before
it exits). Requests that arrive after that get ESHUTDOWN.

Example: serve a disk, pause it for a snapshot of its file, resume:
    nbdfabric node file disk.img --listen unix:disk.sock &
    nbdfabric node pause pause-control=disk.ctl --upstream 'nbd+unix:///?socket=disk.sock' \\
        --listen unix:vm.sock &
    echo p | nc -U disk.ctl     # P: no request is in flight: snapshot disk.img now
    cp --reflink disk.img snap.img
    echo r | nc -U disk.ctl     # R

Differences from nbdkit 1.32: control connections are served side by side (nbdkit takes one at
a time, a second waiting until the first closes); the rules above for a client that goes away
and for a stop while paused; a regular file at the socket's path is refused, not deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from typing import Any

from pydantic import field_validator

from ..base import Backend, Filter
from ..params import Params, param
from ..registry import register
from ..server.addresses import UNIX_PATH_MAX, Address, AddressError, open_listener

log = logging.getLogger("nbdfabric.pause")

#: Bytes skipped without a reply (nbdkit's: what `echo` and `nc` add around a command).
SKIPPED = frozenset(b" \t\n")
PAUSE, RESUME = ord("p"), ord("r")


class PauseParams(Params):
    pause_control: str = param(
        ..., "unix socket taking the commands p (pause) and r (resume)", path=True
    )

    @field_validator("pause_control")
    @classmethod
    def _socket_path(cls, path: str) -> str:
        if not path:
            raise ValueError("needs the path of the control socket to make")
        if "\0" in path:
            raise ValueError("a path cannot hold a NUL byte")
        if len(os.fsencode(path)) > UNIX_PATH_MAX:
            raise ValueError(
                f"the path is {len(os.fsencode(path))} bytes long; a unix socket path may "
                f"have at most {UNIX_PATH_MAX}"
            )
        return path


@register
class Pause(Filter):
    """Holds requests while paused through a control socket (p, r), for snapshots."""

    kind = "pause"
    Params = PauseParams
    params: PauseParams

    def __init__(self, params: PauseParams, next: Backend) -> None:
        super().__init__(params, next)
        self.path = os.path.abspath(params.pause_control)
        self._listener: socket.socket | None = None
        self._made: tuple[int, int] | None = None  #: (st_dev, st_ino) of the socket we made
        self._acceptor: asyncio.Task[None] | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if self.node is None:
            raise RuntimeError("pause: no node serves this backend: nothing to pause")
        self._listener = self._listen()
        try:
            await self.next.start()
        except BaseException:
            self._close()
            raise
        self._acceptor = asyncio.get_running_loop().create_task(self._accept())

    def _listen(self) -> socket.socket:
        given = self.params.pause_control
        try:
            mode = os.lstat(given).st_mode
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ValueError(f"pause: pause-control={given}: {exc.strerror}") from None
        else:
            if not stat.S_ISSOCK(mode):
                raise ValueError(
                    f"pause: pause-control={given}: there is a file there that is not a socket "
                    "(only a socket is replaced)"
                )
        try:
            sock = open_listener(Address("unix", path=given))
        except AddressError as exc:
            why = str(exc).rpartition(": ")[2]
            raise ValueError(f"pause: pause-control={given}: cannot listen: {why}") from None
        made = os.stat(given)
        self._made = (made.st_dev, made.st_ino)
        return sock

    def sockets(self) -> list[str]:
        return [self.params.pause_control] if self._made is not None else []

    async def stop(self) -> None:
        if self._acceptor is not None:
            self._acceptor.cancel()
        tasks = [t for t in (self._acceptor, *self._clients) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._acceptor = None
        self._close()
        await self.next.stop()

    def _close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._made is not None:
            # Only ours: a node started since on the same path made a socket of its own.
            with contextlib.suppress(OSError):
                now = os.stat(self.params.pause_control)
                if (now.st_dev, now.st_ino) == self._made:
                    os.unlink(self.params.pause_control)
            self._made = None

    # The control socket ----------------------------------------------------------------------

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._listener)
            except OSError as exc:  # out of file descriptors, say: the socket stays
                log.warning("pause: accepting on %s failed: %s", self.path, exc)
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._serve(conn))
            self._clients.add(task)
            task.add_done_callback(self._clients.discard)

    async def _serve(self, conn: socket.socket) -> None:
        """One control connection: its commands in order, each answered before the next."""
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        try:
            while data := await loop.sock_recv(conn, 256):
                for byte in data:
                    reply = await self._command(byte)
                    if reply:
                        await loop.sock_sendall(conn, reply)
        except OSError:
            pass  # the client went away: a pause it asked for still holds
        except RuntimeError as exc:  # asked to pause while the node shuts down: no reply
            log.info("pause: %s", exc)
        finally:
            conn.close()

    async def _command(self, byte: int) -> bytes:
        node = self.node
        assert node is not None, "checked in start()"
        if byte in SKIPPED:
            return b""
        if byte == PAUSE:
            if not node.paused:
                log.info("pause: pausing (control socket)")
            await node.pause()
            return b"P"
        if byte == RESUME:
            if node.paused:
                log.info("pause: resuming %d held requests (control socket)", node.held)
            node.resume()
            return b"R"
        return b"X"

    def status(self) -> dict[str, Any]:
        node = self.node
        state = {
            "control": self.path,
            "paused": bool(node and node.paused),
            "held": node.held if node is not None else 0,
        }
        return {**self.next.status(), "pause": state}
