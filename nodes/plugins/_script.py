"""The protocol of nbdkit's scriptable plugins (nbdkit-sh-plugin(3)), shared by sh and eval.

Every plugin method is one run of a program, `PROGRAM METHOD ARGS...`, with `$tmpdir` (a
directory of the node's own, removed at exit) in its environment: arguments as nbdkit passes
them, the handle `open` printed as the first argument of each call on that connection, a write's
data on stdin, a read's bytes on stdout, and the answer in the exit status: 0 done, 1 and 4-255
failed (stderr "ENAME message" says which errno: `ENOSPC Out of space`, else EIO), 2 the method
is missing (nbdkit's default is used), 3 false. A run that does not finish within
`script-timeout`, is killed by a signal, prints what cannot be parsed or a wrong number of bytes
fails that one request with EIO, said in the node's log: the node serves on. Runs are
subprocesses the event loop waits for; how many run at once is the script's `thread_model`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Protocol

from pydantic import BeforeValidator, ConfigDict, Field, model_validator

from ..base import Backend, Capabilities, Extents, Holes, MultiExport, Plugin, Support
from ..base import current_client as _client
from ..params import BARE, CONFIG_KEY, Duration, Params, param
from ..params import Params as ParamsModel
from ..protocol.constants import CmdFlag, Extent
from ..spawn import run_captured
from ..values import parse_size

log = logging.getLogger("nbdfabric.script")

#: Exit statuses with a meaning (any other is a failure, as 1).
OK, ERROR, MISSING, FALSE = 0, 1, 2, 3
#: Most a method may print when its output is the answer (sizes, handles, lists, extents).
MAX_OUTPUT = 16 * 1024 * 1024
#: What is kept of the output of methods whose output means nothing (pwrite, flush, ...).
IGNORED_OUTPUT = 4096
#: The longest export name or description sent (NBD's limit on a string).
MAX_STRING = 4096
#: nbdkit's thread models, loosest last.
THREAD_MODELS = (
    "serialize_connections",
    "serialize_all_requests",
    "serialize_requests",
    "parallel",
)
_DEFAULT_MODEL = "serialize_all_requests"
_ERRNO_WORD = re.compile(rb"(E[A-Z0-9]+)(?:[ \t\r\n]+|$)", re.IGNORECASE)
_FUA, _NO_HOLE, _FAST_ZERO = int(CmdFlag.FUA), int(CmdFlag.NO_HOLE), int(CmdFlag.FAST_ZERO)
_REQ_ONE = int(CmdFlag.REQ_ONE)


# Params ---------------------------------------------------------------------------------------


def _config_value(value: Any) -> Any:
    """A value handed to the script's config method: text (YAML's numbers and booleans as
    written on a command line), or a list of them for a key given several times."""
    if isinstance(value, list):
        return [_config_value(v) for v in value] if all(_scalar(v) for v in value) else _bad()
    return _scalar_text(value) if _scalar(value) else _bad()


def _scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool)


def _scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if "\0" in text:
        raise ValueError("a value cannot hold a NUL byte (it is a program argument)")
    return text


def _bad() -> Any:
    raise ValueError("give a string, or a list of strings for a key given several times")


ConfigValue = Annotated[Any, BeforeValidator(_config_value)]


class ScriptParams(Params):
    """Params of a scriptable kind: its own, and any other `key=value`, handed in order to the
    script's `config` method (nbdkit's rule for what a key is: a letter, then letters, digits,
    `_`, `-` or `.`)."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, ConfigValue] = Field(init=False)  # type: ignore[assignment]

    script_timeout: Duration = param(
        60.0,
        "longest a script may take for one method before it is killed and the request fails "
        "with EIO (0: no limit, as nbdkit)",
    )

    @model_validator(mode="before")
    @classmethod
    def _config_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            own = {n for n, f in cls.model_fields.items()} | {
                f.alias for f in cls.model_fields.values() if f.alias
            }
            for key in data:
                if key not in own and key != BARE and not CONFIG_KEY.fullmatch(str(key)):
                    raise ValueError(
                        f"{str(key)!r} is not a parameter name (a letter, then letters, "
                        "digits, '_', '-' or '.')"
                    )
        return data

    def config_pairs(self) -> list[tuple[str, str]]:
        """(key, value) for each call of the script's config method, in the order given; the
        values given without a key under BARE."""
        pairs = []
        for key, value in (self.model_extra or {}).items():
            for item in value if isinstance(value, list) else [value]:
                pairs.append((key, item))
        return pairs


# One run --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """What one run of a method answered."""

    status: int  #: OK, ERROR, MISSING or FALSE
    out: bytes = b""  #: its stdout (not for pread: the bytes went to the buffer)
    written: int = 0  #: bytes it wrote on stdout
    errno: int = 0  #: for ERROR
    message: str = ""  #: for ERROR

    @property
    def text(self) -> str:
        """stdout as text, one final newline dropped (nbdkit's rule for handles and names)."""
        text = self.out.decode(errors="replace")
        return text[:-1] if text.endswith("\n") else text


def error_of(stderr: bytes) -> tuple[int, str]:
    """The errno and message a failed run printed on stderr: `ENOSPC Out of space` (any case;
    the name at the very start, then whitespace or the end), else EIO and all it said."""
    m = _ERRNO_WORD.match(stderr)
    if m is not None:
        code = getattr(errno, m.group(1).decode().upper(), None)
        if isinstance(code, int):
            return code, stderr[m.end() :].decode(errors="replace").strip()
    return errno.EIO, stderr.decode(errors="replace").strip()


def _words(*named: tuple[int | bool, str]) -> str:
    """The flags argument nbdkit passes: the names of those set, comma-separated."""
    return ",".join(name for on, name in named if on)


# Parsing what methods print -------------------------------------------------------------------


def parse_export_list(text: str) -> list[tuple[str, str]]:
    """list_exports' (and default_export's) output: a first line NAMES, INTERLEAVED (name and
    description lines in turn) or NAMES+DESCRIPTIONS (the names, then as many descriptions);
    any other first line is a name, as the lines after it."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        return []
    mode, rest = lines[0], lines[1:]
    if mode == "INTERLEAVED":
        return [(rest[i], rest[i + 1] if i + 1 < len(rest) else "") for i in range(0, len(rest), 2)]
    if mode == "NAMES+DESCRIPTIONS":
        half = (len(rest) + 1) // 2
        names, descriptions = rest[:half], rest[half:]
        return [(n, descriptions[i] if i < len(descriptions) else "") for i, n in enumerate(names)]
    return [(n, "") for n in (rest if mode == "NAMES" else lines)]


def _extent_type(word: str) -> int:
    if word.isascii() and word.isdigit():
        return int(word) & (Extent.HOLE | Extent.ZERO)
    kinds = {"hole": int(Extent.HOLE), "zero": int(Extent.ZERO)}
    flags = 0
    for part in word.split(","):
        flags |= kinds.get(part, 0)
    return flags


def parse_extents(text: str, offset: int, size: int) -> Extents:
    """extents' output, `OFFSET LENGTH [TYPE]` a line (sizes as nbdkit_parse_size reads them;
    TYPE a number or `hole`, `zero`, `hole,zero`), as (length, flags) from `offset`: the first
    may start before it, each must start where the one before ended, none counts past `size`."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    out: Extents = []
    end: int | None = None
    for line in lines:
        fields = line.split()
        try:
            if len(fields) < 2:
                raise ValueError("expected OFFSET LENGTH [TYPE]")
            start, length = parse_size(fields[0]), parse_size(fields[1])
        except ValueError as exc:
            raise OSError(errno.EIO, f"extents: cannot parse {line!r}: {exc}") from None
        if end is None and start > offset:
            raise OSError(errno.EINVAL, f"extents: the first starts at {start}, after {offset}")
        if end is not None and start != end:
            raise OSError(
                errno.EINVAL, "extents: each must start where the one before ended, in order"
            )
        end = start + length
        lo, hi = max(start, offset), min(end, size)
        if hi > lo:
            out.append((hi - lo, _extent_type(fields[2]) if len(fields) > 2 else 0))
    if not out:
        raise OSError(errno.EINVAL, f"extents: none given from offset {offset}")
    return out


def parse_block_size(text: str) -> tuple[int, int, int]:
    """block_size's output, `MINIMUM PREFERRED MAXIMUM` (0 0 0: no constraints), checked as
    nbdkit checks a plugin's block sizes."""
    fields = text.split()
    try:
        if len(fields) != 3:
            raise ValueError("expected MINIMUM PREFERRED MAXIMUM")
        low, preferred, high = (parse_size(f) for f in fields)
    except ValueError as exc:
        raise OSError(errno.EIO, f"block_size: cannot parse {text.strip()!r}: {exc}") from None
    return check_block_size(low, preferred, high)


def check_block_size(low: int, preferred: int, high: int) -> tuple[int, int, int]:
    """A plugin's block sizes, checked as nbdkit checks them (0 0 0: no constraints)."""
    if (low, preferred, high) == (0, 0, 0):
        return 0, 0, 0
    if not (_power_of_two(low) and low <= 65536):
        raise OSError(errno.EINVAL, "block_size: the minimum must be a power of 2 up to 64K")
    if not (_power_of_two(preferred) and 512 <= preferred <= 32 * 1024 * 1024):
        raise OSError(errno.EINVAL, "block_size: the preferred must be a power of 2, 512 to 32M")
    if high != 0xFFFFFFFF and (high < low or high % low or high > 0xFFFFFFFF):
        raise OSError(
            errno.EINVAL, "block_size: the maximum must be a multiple of the minimum, or 4G-1"
        )
    return low, preferred, high


def _power_of_two(n: int) -> bool:
    return n > 0 and not n & (n - 1)


def parse_support(method: str, text: str) -> Support:
    """can_fua's and can_cache's output: none, emulate or native."""
    word = text.strip()
    if word not in ("none", "emulate", "native"):
        raise OSError(errno.EIO, f"{method}: expected none, emulate or native, not {word!r}")
    return Support[word.upper()]


# Which runs may go at once --------------------------------------------------------------------


class Gate:
    """The script's thread_model: serialize_all_requests (the default: never two runs at
    once), serialize_requests (one at a time per connection), serialize_connections (also one
    connection at a time: the others wait before their handshake) or parallel."""

    def __init__(self) -> None:
        self.model = _DEFAULT_MODEL
        self._all = asyncio.Lock()
        self._per_client: dict[int, asyncio.Lock] = {}
        self._slot = asyncio.Lock()
        self._holder: int | None = None

    def turn(self) -> AbstractAsyncContextManager[Any]:
        if self.model == "parallel":
            return contextlib.nullcontext()
        if self.model == "serialize_all_requests":
            return self._all
        client = _client.get().connection_id
        lock = self._per_client.get(client)
        if lock is None:
            lock = self._per_client[client] = asyncio.Lock()
        return lock

    async def admit(self) -> None:
        if self.model == "serialize_connections":
            await self._slot.acquire()
            self._holder = _client.get().connection_id

    def leave(self) -> None:
        client = _client.get().connection_id
        self._per_client.pop(client, None)
        if self._holder == client and self._slot.locked():
            self._holder = None
            self._slot.release()


# Each client's export --------------------------------------------------------------------------


class ClientExport(Protocol):
    requested: str  #: the name the client asked for

    async def close(self) -> None: ...


class ClientExports:
    """What the script kinds (sh, eval, python) share for their clients: a client's export is
    opened when the handshake looks it up (INFO then GO for the same name share the handle),
    and closed when the client leaves or the node stops; the export list a client asked for is
    kept for its LIST. The kind says how to list (`_list`) and to open (`_open_export`, an
    OSError refusing the client) its exports; `gate` is its thread model."""

    gate: Gate

    def _init_client_exports(self) -> None:
        self._pending: dict[int, Any] = {}  #: looked up, not yet opened, by client
        self._open: set[Any] = set()
        self._closing: set[asyncio.Future[Any]] = set()  #: close runs not finished
        self._lists: dict[int, list[tuple[str, str]] | OSError] = {}
        self._last_list: list[tuple[str, str]] = []

    async def _list(self) -> list[tuple[str, str]]:
        raise NotImplementedError

    async def _open_export(self, name: str) -> ClientExport:
        raise NotImplementedError

    async def _close_exports(self) -> None:
        """At stop: every client's export closed, and every close run finished."""
        for export in [*self._pending.values(), *self._open]:
            await export.close()
        self._pending.clear()
        await asyncio.gather(*self._closing, return_exceptions=True)

    async def connection_ended(self) -> None:
        client = _client.get().connection_id
        self._lists.pop(client, None)
        try:
            export = self._pending.pop(client, None)
            if export is not None:
                await export.close()
        finally:
            self.gate.leave()

    def exports(self) -> list[tuple[str, str]]:
        listed = self._lists.get(_client.get().connection_id, self._last_list)
        if isinstance(listed, OSError):
            raise listed
        return listed

    def for_export(self, name: str) -> Backend | None:
        export = self._pending.get(_client.get().connection_id)
        return export if export is not None and export.requested == name else None

    async def prepare_export(self, name: str | None) -> None:
        client = _client.get().connection_id
        if name is None:
            try:
                self._lists[client] = self._last_list = await self._list()
            except OSError as exc:
                self._lists[client] = exc
            return
        export = self._pending.get(client)
        if export is not None and export.requested == name:
            return  # INFO, then GO: the handle opened for the first serves both
        if export is not None:
            del self._pending[client]
            await export.close()
        try:
            self._pending[client] = await self._open_export(name)
        except OSError:
            pass  # said in the log; for_export() finds nothing: the client is refused


class OpenedExport:
    """A script kind's export, one client's (ClientExports): the handle the script's open
    gave for the name the client asked for, and, once the client's GO takes it, the
    capabilities and identity the script gave then; it moves from the looked-up exports to the
    open ones, and the client's leaving closes it. Put it before Backend in the bases."""

    owner: Any  #: the kind's node backend (ClientExports, Plugin); subclasses say which

    def __init__(self, owner: Any, requested: str, name: str, handle: Any) -> None:
        super().__init__(owner.params)  # type: ignore[call-arg]  # Backend's: next in the MRO
        self.kind = owner.kind
        self.owner = owner
        self.requested = requested  #: the name the client asked for
        self.name = name  #: the name it was opened with ("" asked: default_export's)
        self.handle = handle
        self.description = ""
        self.caps = Capabilities(size=0)
        self.closed = False

    async def close(self) -> None:
        raise NotImplementedError

    def capabilities(self) -> Capabilities:
        return self.caps

    def export_identity(self, requested: str) -> tuple[str, str]:
        return self.name, self.description

    async def open_connection(self) -> None:
        owner = self.owner
        client = _client.get().connection_id
        if owner._pending.get(client) is self:
            del owner._pending[client]
        owner._open.add(self)

    async def close_connection(self) -> None:
        await self.close()


# The node's backend ---------------------------------------------------------------------------


class ScriptPlugin(ClientExports, Plugin):
    """A scriptable kind's node: it runs the node-wide methods (load, config, ..., unload), and
    for each client its connection's (preconnect, default_export, list_exports, open and what
    follows): a client's handle is opened when its export is looked up, during the handshake
    (so the node serves several exports, as nbdkit: the names the script takes), and closed
    when it leaves. Subclasses say how a method is run (method_argv) and what comes first."""

    Params = ScriptParams
    params: ScriptParams
    prepares_exports = True
    #: Said when the script has no config method but was given a `key=value`.
    no_config: ClassVar[str] = "the script has no config method (it exits 2)"

    def __init__(self, params: ScriptParams) -> None:
        super().__init__(params)
        self.tmpdir = ""
        self.env: dict[str, str] = {}
        self.gate = Gate()
        self.via_shell = False  #: the program is a script without #!: run by /bin/sh (execvp)
        self.magic_key: str | None = None  #: the key for BARE values (magic_config_key)
        self._init_client_exports()
        self.calls = 0
        self.failures = 0
        self.last_error = ""

    @classmethod
    def multi_export(cls, params: ParamsModel) -> MultiExport | None:
        return "names"

    # What subclasses say ----------------------------------------------------------------------

    def method_argv(self, method: str) -> list[str]:
        """The program run for `method`, with the method name: `PROGRAM METHOD`."""
        raise NotImplementedError

    async def load(self) -> None:
        """What comes before config: sh resolves the script, runs load and magic_config_key;
        eval writes its methods into $tmpdir."""

    @property
    def name(self) -> str:
        """The script as messages name it."""
        return self.kind

    # Running methods --------------------------------------------------------------------------

    async def call(
        self,
        method: str,
        *args: str,
        data: Any = None,
        into: memoryview | None = None,
        output: bool = False,
    ) -> Reply:
        """Run `method` once (outside the gate: callers take their turn), with `data` on its
        stdin, its stdout read `into` a buffer or kept (`output`) or dropped."""
        argv = [*self.method_argv(method), *args]
        if self.via_shell:
            argv = ["/bin/sh", *argv]
        limit = MAX_OUTPUT if output else IGNORED_OUTPUT
        self.calls += 1
        try:
            done = await run_captured(
                argv,
                env=self.env,
                data=data,
                into=into,
                limit=limit,
                kill_over=output or into is not None,
                within=self.params.script_timeout or None,
            )
        except OSError as exc:
            if exc.errno == errno.ENOEXEC and not self.via_shell:
                self.via_shell = True  # a script without #!: execvp runs it with /bin/sh
                return await self.call(method, *args, data=data, into=into, output=output)
            return Reply(ERROR, errno=errno.EIO, message=f"cannot run {argv[0]}: {exc.strerror}")
        except ValueError as exc:  # an argument with a NUL byte
            return Reply(ERROR, errno=errno.EIO, message=f"cannot run {argv[0]}: {exc}")
        if done.timed_out:
            message = f"no answer within {self.params.script_timeout:g}s: killed"
            return Reply(ERROR, errno=errno.EIO, message=message)
        if done.over:
            if into is not None:
                message = (
                    f"incorrect amount of data read: expecting {len(into)} bytes but "
                    "received more from the script"
                )
            else:
                message = f"printed more than {limit} bytes: killed"
            return Reply(ERROR, errno=errno.EIO, message=message)
        status = done.status
        if status in (OK, MISSING, FALSE):
            return Reply(status, done.stdout, done.written)
        code, message = error_of(done.stderr)
        if status < 0:
            message = f"killed by signal {-status}" + (f": {message}" if message else "")
        elif not done.stderr.strip():
            message = "the script exited with an error, but said nothing on stderr"
        return Reply(ERROR, errno=code, message=message)

    async def run(self, method: str, *args: str, **kwargs: Any) -> Reply:
        """call() in the turn the thread model gives."""
        async with self.gate.turn():
            return await self.call(method, *args, **kwargs)

    def failure(self, method: str, reply: Reply, required: bool = False) -> OSError:
        """The OSError a client gets for a run that did not do `method` (said in the log)."""
        if reply.status == ERROR:
            code, message = reply.errno, reply.message
        elif reply.status == MISSING and required:
            code, message = errno.EIO, "the method is required, but the script has none (exit 2)"
        else:
            code, message = errno.EIO, f"unexpected exit status {reply.status} for this method"
        self.failures += 1
        self.last_error = f"{method}: {message or errno.errorcode.get(code, code)}"
        log.warning("%s: %s", self.name, self.last_error)
        return OSError(code, f"{method}: {message}" if message else method)

    async def flag(self, method: str, *args: str) -> bool | None:
        """A boolean method: True (0), False (3), None when missing (2)."""
        reply = await self.run(method, *args)
        if reply.status == OK:
            return True
        if reply.status == FALSE:
            return False
        if reply.status == MISSING:
            return None
        raise self.failure(method, reply)

    async def answer(self, method: str, *args: str, required: bool = False) -> Reply | None:
        """A method whose output is the answer: its Reply, or None when missing (2)."""
        reply = await self.run(method, *args, output=True)
        if reply.status == OK:
            return reply
        if reply.status == MISSING and not required:
            return None
        raise self.failure(method, reply, required)

    # Lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="nbdfabric-")
        self.env = {**os.environ, "tmpdir": self.tmpdir}
        try:
            await self.load()
            await self._configure()
            await self._startup("config_complete")
            reply = await self._startup("thread_model", output=True)
            if reply.status == OK:
                self.gate.model = self._thread_model(reply.text)
            await self._startup("get_ready")
            # nbdkit calls after_fork once it runs in the background, or in the foreground
            # (-f) without forking: always, before it serves. So here, before the node serves.
            await self._startup("after_fork")
        except BaseException:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = ""
            raise

    async def _startup(self, method: str, *args: str, output: bool = False) -> Reply:
        """A node-wide method at start: missing is fine, a failure stops the node."""
        reply = await self.call(method, *args, output=output)
        if reply.status not in (OK, MISSING):
            raise self.failure(method, reply)
        return reply

    async def _configure(self) -> None:
        for key, value in self.params.config_pairs():
            if key == BARE:
                if self.magic_key is None:
                    raise OSError(
                        errno.EINVAL,
                        f"expected key=value, got {value!r}: the script names no "
                        "magic_config_key for values without one",
                    )
                key = self.magic_key
            reply = await self.call("config", key, value)
            if reply.status == MISSING:
                raise OSError(errno.EINVAL, f"{key}={value}: {self.no_config.format(key=key)}")
            if reply.status != OK:
                raise self.failure("config", reply)

    def _thread_model(self, text: str) -> str:
        if text in THREAD_MODELS:
            return text
        log.warning(
            "%s: thread_model printed %r, none of %s: using %s",
            self.name,
            text,
            ", ".join(THREAD_MODELS),
            _DEFAULT_MODEL,
        )
        return _DEFAULT_MODEL

    async def stop(self) -> None:
        await self._close_exports()
        if not self.tmpdir:
            return
        reply = await self.call("unload")
        if reply.status not in (OK, MISSING):  # errors from unload are ignored (nbdkit)
            log.info("%s: unload: %s", self.name, reply.message)
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        self.tmpdir = ""

    def capabilities(self) -> Capabilities:
        # The node as a whole (control plane, shutdown): each client's export has its own.
        return Capabilities(size=0)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "thread_model": self.gate.model,
            "tmpdir": self.tmpdir,
            "connections": len(self._open),
            "calls": self.calls,
            "failures": self.failures,
        }
        if self.last_error:
            out["last_error"] = self.last_error
        return out

    # Clients ----------------------------------------------------------------------------------

    def _read_only(self) -> str:
        return "true" if self.read_only else "false"

    @staticmethod
    def _tls() -> str:
        return "true" if _client.get().tls else "false"

    async def preconnect(self) -> None:
        await self.gate.admit()
        try:
            reply = await self.run("preconnect", self._read_only())
            if reply.status not in (OK, MISSING):
                raise self.failure("preconnect", reply)
        except BaseException:
            self.gate.leave()
            raise

    async def _list(self) -> list[tuple[str, str]]:
        reply = await self.answer("list_exports", self._read_only(), self._tls())
        if reply is None:  # the default export alone
            return [(await self._default_name(), "")]
        return [(n[:MAX_STRING], d[:MAX_STRING]) for n, d in parse_export_list(reply.text)]

    async def _default_name(self) -> str:
        reply = await self.answer("default_export", self._read_only(), self._tls())
        if reply is None:
            return ""
        listed = parse_export_list(reply.out.decode(errors="replace"))
        return listed[0][0][:MAX_STRING] if listed else ""

    async def _open_export(self, requested: str) -> ScriptExport:
        name = requested or await self._default_name()
        reply = await self.answer("open", self._read_only(), name, self._tls())
        handle = "" if reply is None else os.fsdecode(_one_line_off(reply.out)).split("\0")[0]
        export = ScriptExport(self, requested, name, handle)
        try:
            await export.learn()
        except BaseException:
            await export.close()
            raise
        return export


def _one_line_off(out: bytes) -> bytes:
    return out[:-1] if out.endswith(b"\n") else out


# One client's export --------------------------------------------------------------------------


class ScriptExport(OpenedExport, Backend):
    """The export one client opened: its handle, and what the script said of it."""

    owner: ScriptPlugin

    async def learn(self) -> None:
        """Ask the script what the export is, in nbdkit's order (the write side only when
        the export is writable)."""
        o, h = self.owner, self.handle
        reply = await o.answer("get_size", h, required=True)
        assert reply is not None
        try:
            size = parse_size(reply.text.strip())
        except ValueError as exc:
            bad = Reply(ERROR, errno=errno.EIO, message=f"cannot parse {reply.text!r}: {exc}")
            raise o.failure("get_size", bad) from None
        writable = fast_zero = trim = False
        zero, fua_said = Support.NONE, None
        if not o.read_only and await o.flag("can_write", h):
            writable = True
            native = await o.flag("can_zero", h)
            # Without a zero method writes of zeros stand in for it (nbdkit's emulation).
            zero = Support.NATIVE if native else Support.EMULATE
            fast = await o.flag("can_fast_zero", h)
            # Emulated zeroing fails a fast zero at once, so it is "supported" by default.
            fast_zero = fast if fast is not None else zero is Support.EMULATE
            trim = bool(await o.flag("can_trim", h))
            said = await o.answer("can_fua", h)
            fua_said = None if said is None else said.text
        flush = bool(await o.flag("can_flush", h))
        fua = Support.NONE
        if writable:
            if fua_said is not None:
                fua = self._support("can_fua", fua_said)
            elif flush:
                fua = Support.EMULATE
        rotational = bool(await o.flag("is_rotational", h))
        multi_conn = bool(await o.flag("can_multi_conn", h))
        said = await o.answer("can_cache", h)
        cache = Support.NONE if said is None else self._support("can_cache", said.text)
        extents = bool(await o.flag("can_extents", h))
        said = await o.answer("block_size", h)
        low, preferred, high = (0, 0, 0) if said is None else self._block_size(said.text)
        said = await o.answer("export_description", h)
        self.description = "" if said is None else said.text[:MAX_STRING]
        self.caps = Capabilities(
            size=size,
            writable=writable,
            flush=flush,
            fua=fua,
            trim=trim,
            zero=zero,
            fast_zero=fast_zero,
            cache=cache,
            extents=extents,
            multi_conn=multi_conn,
            rotational=rotational,
            block_min=low,
            block_preferred=preferred,
            block_max=min(high, 0xFFFFFFFF),
        )

    def _support(self, method: str, text: str) -> Support:
        try:
            return parse_support(method, text)
        except OSError as exc:
            raise self._bad(method, exc) from None

    def _block_size(self, text: str) -> tuple[int, int, int]:
        try:
            return parse_block_size(text)
        except OSError as exc:
            raise self._bad("block_size", exc) from None

    def _bad(self, method: str, exc: OSError) -> OSError:
        reply = Reply(ERROR, errno=exc.errno or errno.EIO, message=exc.strerror or str(exc))
        return self.owner.failure(method, reply)

    async def close(self) -> None:
        """Run close for the handle (once; a failure is only logged, as nbdkit)."""
        if self.closed:
            return
        self.closed = True
        owner = self.owner
        owner._open.discard(self)
        # Run to the end even when the connection's task is cancelled (the node shutting
        # down): stop() waits for it before unload.
        closing = asyncio.ensure_future(owner.run("close", self.handle))
        owner._closing.add(closing)
        closing.add_done_callback(owner._closing.discard)
        reply = await asyncio.shield(closing)
        if reply.status not in (OK, MISSING):
            owner.failure("close", reply)

    # Requests ---------------------------------------------------------------------------------

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        n = len(buf)
        reply = await self.owner.run("pread", self.handle, str(n), str(offset), into=buf)
        if reply.status != OK:
            raise self.owner.failure("pread", reply, required=True)
        if reply.written != n:
            short = Reply(
                ERROR,
                errno=errno.EIO,
                message=f"incorrect amount of data read: expecting {n} bytes but received "
                f"{reply.written} bytes from the script",
            )
            raise self.owner.failure("pread", short)
        return None

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        fua = _words((flags & _FUA, "fua"))
        reply = await self.owner.run(
            "pwrite", self.handle, str(len(buf)), str(offset), fua, data=buf
        )
        if reply.status != OK:
            raise self.owner.failure("pwrite", reply, required=True)

    async def flush(self, flags: int) -> None:
        await self._optional("flush", self.handle)

    async def trim(self, count: int, offset: int, flags: int) -> None:
        fua = _words((flags & _FUA, "fua"))
        await self._optional("trim", self.handle, str(count), str(offset), fua)

    async def zero(self, count: int, offset: int, flags: int) -> None:
        words = _words(
            (flags & _FUA, "fua"), (not flags & _NO_HOLE, "may_trim"), (flags & _FAST_ZERO, "fast")
        )
        reply = await self.owner.run("zero", self.handle, str(count), str(offset), words)
        if reply.status == MISSING:  # written as zeros instead, unless it had to be fast
            raise OSError(errno.ENOTSUP, "the script has no zero method")
        if reply.status == ERROR and reply.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(reply.errno, reply.message)  # the same: no failure of the script
        if reply.status != OK:
            raise self.owner.failure("zero", reply)

    async def cache(self, count: int, offset: int, flags: int) -> None:
        await self._optional("cache", self.handle, str(count), str(offset))

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        one = _words((flags & _REQ_ONE, "req_one"))
        reply = await self.owner.run(
            "extents", self.handle, str(count), str(offset), one, output=True
        )
        if reply.status != OK:
            raise self.owner.failure("extents", reply, required=True)
        try:
            return parse_extents(reply.out.decode(errors="replace"), offset, self.caps.size)
        except OSError as exc:
            raise self._bad("extents", exc) from None

    async def _optional(self, method: str, *args: str) -> None:
        """A method whose absence means there is nothing to do (flush, trim, cache)."""
        reply = await self.owner.run(method, *args)
        if reply.status not in (OK, MISSING):
            raise self.owner.failure(method, reply)
