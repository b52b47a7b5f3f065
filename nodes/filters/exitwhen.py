"""exitwhen: the node exits gracefully when an event happens (nbdkit-exitwhen-filter).

Events: a file is created or deleted, a pipe is closed, a process exits, or a script says so.
Once one has happened the node takes no new clients (each is closed before the greeting), and
when no client is connected any more it shuts down as on SIGTERM and exits with status 0.

When the events are checked (nbdkit's rule): when the node starts (one that has happened
already: the node exits at once with status 0, serving nobody), when a client connects, when
a client disconnects, and every `exit-when-poll` while no client is connected. So while
clients are connected an event is noticed at the next connection or disconnection; when the
last client leaves after it, the node exits then.

Params (each event param may be given several times; any event ends the node):
- `exit-when-file-created=FILE`: FILE exists (and can be read).
- `exit-when-file-deleted=FILE`: FILE (or a directory on its path) is gone.
  A relative FILE is taken from the directory the node started in.
- `exit-when-pipe-closed=FD` (alias `exit-when-fd-closed`): the read end of a pipe or socket
  this node inherited as FD has been closed at the other end. Nothing is read from it.
- `exit-when-process-exits=PID` (alias `exit-when-pid-exits`): process PID has exited (its
  /proc/PID/stat, opened at start, reads ESRCH; a PID reused by another process is not taken
  for the one that exited).
- `exit-when-script=SCRIPT`: SCRIPT, run by /bin/sh, exits with 88 (0: not yet; 1-87: an
  error is logged and the node serves on; 89 and above are reserved, logged as errors).
- `exit-when-poll` (duration, default 60s): how often events are checked while no client is
  connected. nbdkit takes whole seconds (`exit-when-poll=5`); so does this, and `500ms` too.
With no event param the filter does nothing.

Example: `nbdfabric node exitwhen exit-when-file-created=/run/vm1.stop exit-when-poll=5
--upstream nbd+unix:///?socket=disk.sock`: `touch /run/vm1.stop` ends the node once its
clients are gone. In a topology, give such a node `restart: on-failure` or `restart: never`:
with `always` (the default) the supervisor starts it again.

Differences from nbdkit 1.32: an FD that is not open, or a PID whose /proc/PID/stat cannot be
opened, is refused when the node starts (exit 1, naming the param); nbdkit refuses the PID
alike but takes a bad FD as "the event happened" and exits 0. `exit-when-poll` must be more
than 0 (nbdkit's 0 checks without pause, a busy loop). The alias spellings may each be given
once (the `exit-when-pipe-closed` and `exit-when-process-exits` spellings as often as
wanted). Scripts get /dev/null as stdin, and their stdout goes to the node's stderr (nbdkit's
system() lets them write to its stdout, where `--print-uri` prints).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
from typing import Annotated, Any

from pydantic import AfterValidator, field_validator, model_validator

from ..base import Backend, Filter, StopNode, current_client
from ..params import Duration, Many, Params, param, repeated
from ..registry import register
from ..spawn import DEVNULL, shell
from ..values import c_integer

log = logging.getLogger("nbdfabric.exitwhen")

#: The exit status a script gives for "the event happened".
SCRIPT_EVENT = 88
#: nbdkit's old spellings of two event params.
_ALIASES = {
    "exit-when-fd-closed": "exit-when-pipe-closed",
    "exit-when-pid-exits": "exit-when-process-exits",
}


def _numbers(what: str, signed: bool) -> AfterValidator:
    """Each value a C integer as nbdkit reads it (decimal, 0x hex, 0 octal), not negative."""

    def check(values: list[str]) -> list[str]:
        for text in values:
            n = c_integer(text, signed=signed)
            if n is None or n < 0:
                raise ValueError(f"expected a {what} (a whole number, not negative), not {text!r}")
        return values

    return AfterValidator(check)


class ExitwhenParams(Params):
    exit_when_file_created: Many = repeated("exit when this file exists", path=True)
    exit_when_file_deleted: Many = repeated("exit when this file is gone", path=True)
    exit_when_pipe_closed: Annotated[Many, _numbers("file descriptor", True)] = repeated(
        "exit when the pipe read on this inherited fd is closed (alias exit-when-fd-closed)"
    )
    exit_when_process_exits: Annotated[Many, _numbers("process id", False)] = repeated(
        "exit when the process of this pid exits (alias exit-when-pid-exits)"
    )
    exit_when_script: Many = repeated("exit when this shell command exits with status 88")
    exit_when_poll: Duration = param(60.0, "how often to check while no client is connected")

    spellings = tuple(_ALIASES)

    @model_validator(mode="before")
    @classmethod
    def _nbdkit_aliases(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not (_ALIASES.keys() & data.keys()):
            return data
        data = dict(data)
        for alias, name in _ALIASES.items():
            if alias in data:
                given = data.pop(name, None)
                if given is None:
                    given = data.pop(name.replace("-", "_"), [])
                data[name] = _as_list(given) + _as_list(data.pop(alias))
        return data

    @field_validator("exit_when_poll")
    @classmethod
    def _positive(cls, seconds: float) -> float:
        if seconds <= 0:
            raise ValueError("must be more than 0 (seconds between checks)")
        return seconds


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


class _Event:
    """One event to watch for: `happened()` never raises (a failed check is logged)."""

    def __init__(self, what: str) -> None:
        self.what = what

    async def happened(self) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _FileCreated(_Event):
    def __init__(self, path: str) -> None:
        super().__init__(f"exit-when-file-created: {path} created")
        self.path = path

    async def happened(self) -> bool:
        return os.access(self.path, os.R_OK)  # nbdkit's test: there and readable


class _FileDeleted(_Event):
    def __init__(self, path: str) -> None:
        super().__init__(f"exit-when-file-deleted: {path} deleted")
        self.path = path

    async def happened(self) -> bool:
        try:
            os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return True
        except OSError as exc:
            log.error("exit-when-file-deleted: %s: %s", self.path, exc.strerror)
        return False


class _PipeClosed(_Event):
    def __init__(self, fd: int) -> None:
        super().__init__(f"exit-when-pipe-closed: fd {fd} closed")
        try:
            os.fstat(fd)
        except OSError:
            raise ValueError(
                f"exitwhen: exit-when-pipe-closed={fd}: that file descriptor is not open"
            ) from None
        self.fd = fd

    async def happened(self) -> bool:
        poller = select.poll()
        poller.register(self.fd, 0)  # no events asked for: hang-up and invalid come anyway
        try:
            ready = poller.poll(0)
        except OSError as exc:
            log.error("exit-when-pipe-closed: poll: %s", exc.strerror)
            return False
        revents = ready[0][1] if ready else 0
        if revents & select.POLLNVAL:
            log.error("exit-when-pipe-closed: invalid file descriptor %d", self.fd)
        return bool(revents & (select.POLLHUP | select.POLLNVAL))


class _ProcessExits(_Event):
    def __init__(self, pid: int) -> None:
        super().__init__(f"exit-when-process-exits: process {pid} exited")
        # Held open: once the process is gone this reads ESRCH even if its pid is reused.
        path = f"/proc/{pid}/stat"
        try:
            self.fd: int | None = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise OSError(exc.errno, f"exit-when-process-exits: {path}: {exc.strerror}") from None

    async def happened(self) -> bool:
        if self.fd is None:
            return False
        try:
            os.pread(self.fd, 1, 0)
        except ProcessLookupError:
            return True
        except OSError as exc:
            log.error("exit-when-process-exits: read: %s", exc.strerror)
        return False

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _Script(_Event):
    def __init__(self, script: str) -> None:
        super().__init__(f"exit-when-script: {script!r} detected the event")
        self.script = script

    async def happened(self) -> bool:
        try:
            proc = await shell(self.script, stdin=DEVNULL, stdout=2)
            status = await proc.wait()
        except OSError as exc:
            log.error("exit-when-script: %s: %s", self.script, exc.strerror or exc)
            return False
        if status == SCRIPT_EVENT:
            return True
        if status != 0:
            how = f"killed by signal {-status}" if status < 0 else f"exited with {status}"
            log.error("exit-when-script: %s: %s", self.script, how)
        return False


def events_of(p: ExitwhenParams) -> list[_Event]:
    """The events the params name, opened (process ids) and checked (fds) now."""
    events: list[_Event] = []
    try:
        events += [_FileCreated(os.path.abspath(f)) for f in p.exit_when_file_created]
        events += [_FileDeleted(os.path.abspath(f)) for f in p.exit_when_file_deleted]
        events += [_PipeClosed(_number(fd)) for fd in p.exit_when_pipe_closed]
        events += [_ProcessExits(_number(pid)) for pid in p.exit_when_process_exits]
        events += [_Script(s) for s in p.exit_when_script]
    except BaseException:
        for event in events:
            event.close()
        raise
    return events


def _number(text: str) -> int:
    n = c_integer(text, signed=True)
    assert n is not None, "checked by the params"
    return n


@register
class Exitwhen(Filter):
    """Exits the node gracefully when a file, pipe, process or script says so."""

    kind = "exitwhen"
    passes_contexts = True  #: meta contexts pass through (see Filter)
    Params = ExitwhenParams
    params: ExitwhenParams

    def __init__(self, params: ExitwhenParams, next: Backend) -> None:
        super().__init__(params, next)
        self.events: list[_Event] = []
        self.exiting = False  #: an event has happened (it stays so)
        #: Clients between their handshake's end and their disconnection, by connection id.
        self.clients: set[int] = set()
        #: Checks, counting and the decision to exit, one at a time (nbdkit's lock): a client
        #: that opens while the poller's script runs is not missed by it.
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.events = events_of(self.params)
        try:
            if await self._check():
                raise StopNode("exitwhen: the event happened before the node started")
            await self.next.start()
        except BaseException:
            self._close_events()
            raise
        if self.events:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        self._close_events()
        await self.next.stop()

    def _close_events(self) -> None:
        events, self.events = self.events, []
        for event in events:
            event.close()

    async def _check(self) -> bool:
        """nbdkit's check_for_event: every event is checked until one has happened."""
        if not self.exiting:
            for event in self.events:
                if await event.happened():
                    log.info("exitwhen: %s", event.what)
                    self.exiting = True
        return self.exiting

    async def _poll(self) -> None:
        """While no client is connected, check every exit-when-poll."""
        while True:
            async with self._lock:
                if not self.clients and await self._check():
                    self._exit("exitwhen: exiting: no client is connected")
                    return
            await asyncio.sleep(self.params.exit_when_poll)

    def _exit(self, why: str) -> None:
        log.info("%s", why)
        if self.stop_node is not None:
            self.stop_node()

    async def preconnect(self) -> None:
        async with self._lock:
            if await self._check():
                raise OSError(
                    errno.ESHUTDOWN, "exitwhen: the node is exiting: rejecting new connection"
                )
        await self.next.preconnect()

    async def open_connection(self) -> None:
        await self.next.open_connection()
        async with self._lock:
            self.clients.add(current_client.get().connection_id)

    async def close_connection(self) -> None:
        try:
            await self.next.close_connection()
        finally:
            await self._client_gone(current_client.get().connection_id)

    async def _client_gone(self, client: int) -> None:
        async with self._lock:
            if client not in self.clients:
                return  # its open_connection() failed: it was never counted
            await self._check()
            self.clients.discard(client)
            if not self.clients and self.exiting:
                self._exit("exitwhen: exiting on last client connection")

    def status(self) -> dict[str, Any]:
        state = {"connected": len(self.clients), "exiting": self.exiting}
        return {**self.next.status(), "exitwhen": state}
