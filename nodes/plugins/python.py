"""python: a disk served by a Python script written for nbdkit-python-plugin, unchanged.

The script is run in the node's own interpreter as nbdkit runs it: a module named
`__main__` (not put in sys.modules) whose `__file__` is the path as given, importing our
`nbdkit` module (put in sys.modules first): nbdkit 1.32's `debug`, `export_name`, `set_error`,
`parse_size`, `shutdown` and constants (THREAD_MODEL_*, FLAG_MAY_TRIM, FLAG_FUA, FLAG_REQ_ONE,
FLAG_FAST_ZERO, FUA_*, CACHE_*, EXTENT_HOLE, EXTENT_ZERO), and later nbdkit's `is_tls` and
`parse_bool`. `API_VERSION = 2` is the current API; without it the script has API 1, as nbdkit
(`pread(h, count, offset)` returns the bytes, `pwrite(h, buf, offset)`, `flush(h)`,
`trim(h, count, offset)`, `zero(h, count, offset, may_trim)`: FUA is done by a flush after).

Callbacks, in nbdkit's order: `config(key, value)` for every param that is not the node's own,
in the order given, `config_complete`, `thread_model`, `get_ready`, `after_fork` (nbdkit runs it
once it is in the background, or at once with -f: here once, before the node serves); then for
each client `preconnect(readonly)`, `list_exports(readonly, is_tls)` (names or (name,
description) tuples) and `default_export(readonly, is_tls)` when asked, `open(readonly)` (any
value is the handle; export_name() says which export), `get_size(h)`, `can_write`, `can_zero`,
`can_fast_zero`, `can_trim`, `can_fua`, `can_flush`, `is_rotational`, `can_multi_conn`,
`can_cache`, `can_extents`, `block_size` (a (minimum, preferred, maximum) triple),
`export_description`, its requests (`pread(h, buf, offset, flags)` fills buf,
`pwrite(h, buf, offset, flags)`, `flush(h, flags)`, `trim`, `zero`, `cache(h, count, offset,
flags)`, `extents(h, count, offset, flags)` returns (offset, length, type) tuples), `close(h)`;
`cleanup()` when the node stops. `open`, `get_size` and `pread` are required. A missing can_*
is nbdkit's python default: true where its request's callback is defined (pwrite, flush, trim,
zero, extents; cache: native), FUA emulated by flush where flush is defined, fast zero where
zero is not (written as zeros, a fast zero fails at once), multi-conn and rotational false;
one that returns anything but True itself says false (1 too, as nbdkit 1.32).
An exception fails its request with the errno set_error() chose, else EIO, and its traceback
(the script's frames) goes to the node's log; a zero that fails with EOPNOTSUPP is written as
zeros instead. An exception before the node serves (loading, a required callback missing,
config, ..., after_fork) ends the node with status 1 and the same description.

How callbacks run: each on a worker thread of the node, never on its event loop, which serves
handshakes, other clients' replies and gRPC meanwhile, in the turns the script's thread_model
gives (as sh's: serialize_all_requests, nbdkit's default for Python, one callback at a time in the
node; serialize_requests, one per client; serialize_connections, one client at a time;
parallel), at most 16 at once. The GIL runs one thread's Python at a time: threads help a
script that waits (I/O, sleep, C code that lets the GIL go), as under nbdkit; a script that
computes shares the GIL with the loop, which gets it back every switch interval (5 ms).
Measured on this project's 2-core VM, parallel model, while one callback computed for 3 s:
another client's 4K reads took 0.07 ms median, 10.5 ms p99 (nbdkit 1.32: 0.03 and 5.3 ms),
a new client's handshake 24 ms (nbdkit: 33 ms); idle, 0.11 ms median (nbdkit: 0.05 ms).
A callback that has not returned within `script-timeout` (its wait for its turn included)
fails its request with EIO, said in the log. Python cannot stop a thread: an overdue callback
runs on, and keeps its turn until it returns (the thread model holds); the requests waiting for
that turn fail in the same way once they have waited `script-timeout`. So a script that hangs
costs its clients errors, a few a minute, not a node frozen for good; it serves again once the
callback returns. The loading and the start-up callbacks run on the node's main thread (signal
handlers may be set there), without a time limit, as nbdkit's.

Params: `script` (magic: the Python file), `script-timeout` (default 60s; 0: none, as nbdkit),
and any other `key=value`, passed to `config` (nbdkit's python plugin has no magic_config_key:
a second bare word is refused).

Example: `nbdfabric node python ramdisk.py size=64M --listen unix:/tmp/py.sock` with the
ramdisk example of nbdkit-python-plugin(3).

Differences from nbdkit 1.32: a callback overdue by `script-timeout` fails its request (nbdkit
waits forever). The script is not sys.modules["__main__"] (the node's is), sys.argv is the
node's (nbdkit's is [""]), and the script shares the interpreter with the node (what it
imports, its threads, its GIL). pread gets a scratch buffer copied into the reply, pwrite a
read-only copy of the data: an overdue callback never writes into a buffer the node reused. A
client's export is opened when it looks it up and kept for its GO (as sh's). An export whose
open or can_* fails is refused as unknown. A key given several times goes to `config` with
each value where it was first given (`a=1 b=2 a=3`: a 1, a 3, b 2; as sh's). Requests that
break block_size are refused with EINVAL. An errno set_error() gives that the node's errno map
does not know reaches the client as EIO (nbdkit: EINVAL). With API 1, can_fua's NATIVE is
taken as EMULATE, a flush after (API 1's callbacks take no flags; nbdkit drops the FUA). On
nbdkit.shutdown() the node closes its clients' connections once their requests are answered
(nbdkit waits for them to leave).
"""

from __future__ import annotations

import asyncio
import builtins
import errno
import logging
import queue
import sys
import threading
import traceback
import types
from collections.abc import Callable, Iterable
from typing import Any

from ..base import Backend, Capabilities, Extents, Holes, MultiExport, Plugin, StopNode, Support
from ..base import current_client as _client
from ..params import BARE, Duration, param
from ..params import Params as ParamsModel
from ..protocol.constants import CmdFlag, Extent
from ..registry import register
from ..values import parse_size
from ._script import (
    MAX_STRING,
    THREAD_MODELS,
    ClientExports,
    Gate,
    OpenedExport,
    ScriptParams,
    check_block_size,
)

log = logging.getLogger("nbdfabric.python")

#: The callbacks a script must define (nbdkit refuses it to start without them).
REQUIRED = ("open", "get_size", "pread")
#: The most callbacks running at once (nbdkit's default of 16 threads for a parallel plugin).
MAX_THREADS = 16
# nbdkit's flag bits, as its python module numbers them (not NBD's wire bits).
MAY_TRIM, FUA, REQ_ONE, FAST_ZERO = 1, 2, 4, 8
_FUA, _NO_HOLE = int(CmdFlag.FUA), int(CmdFlag.NO_HOLE)
_FAST_ZERO, _REQ_ONE = int(CmdFlag.FAST_ZERO), int(CmdFlag.REQ_ONE)
_TYPES = int(Extent.HOLE | Extent.ZERO)


class ScriptError(ValueError):
    """The script failed before the node serves: `nbdfabric node` prints it and exits 1."""


def described(exc: BaseException) -> str:
    """An exception of the script's as a person reads it: what, then where (the script's
    frames and those of what it called; none of this module's), without the traceback banner."""
    what = "".join(traceback.format_exception_only(type(exc), exc)).rstrip()
    if isinstance(exc, SyntaxError):
        return what  # it says where itself
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != __file__]
    where = "".join(traceback.format_list(frames)).rstrip()
    return f"{what}\n{where}" if where else what


def parse_bool(text: str) -> bool:
    """nbdkit_parse_bool's words, any case."""
    word = str(text).strip().lower()
    if word in ("1", "true", "t", "yes", "y", "on"):
        return True
    if word in ("0", "false", "f", "no", "n", "off"):
        return False
    raise ValueError(f"could not decipher boolean ({text})")


# The nbdkit module ----------------------------------------------------------------------------


class _Call(threading.local):
    """What the callback running on this thread may ask of the nbdkit module."""

    error = 0  #: what set_error() chose
    export: str | None = None  #: the connection's export (None: no connection)
    tls = False


def nbdkit_module(call: _Call, shutdown: Callable[[], None]) -> types.ModuleType:
    """The `nbdkit` module a script imports: nbdkit 1.32's python module, and two of later
    versions (is_tls, parse_bool)."""
    m = types.ModuleType("nbdkit", "nbdfabric's stand-in for nbdkit's python module")

    def debug(msg: str) -> None:
        log.debug("%s", msg)

    def export_name() -> str:
        if call.export is None:
            raise RuntimeError("nbdkit.export_name failed")  # nbdkit: no connection here
        return call.export

    def is_tls() -> bool:
        if call.export is None:
            raise RuntimeError("nbdkit.is_tls failed")
        return call.tls

    def set_error(err: int) -> None:
        call.error = int(err)

    def size(text: str) -> int:
        try:
            return parse_size(str(text))
        except ValueError:
            raise ValueError("Unable to parse string as size") from None

    for name, value in {
        "debug": debug,
        "export_name": export_name,
        "is_tls": is_tls,
        "set_error": set_error,
        "parse_size": size,
        "parse_bool": parse_bool,
        "shutdown": shutdown,
        **{f"THREAD_MODEL_{t.upper()}": i for i, t in enumerate(THREAD_MODELS)},
        "FLAG_MAY_TRIM": MAY_TRIM,
        "FLAG_FUA": FUA,
        "FLAG_REQ_ONE": REQ_ONE,
        "FLAG_FAST_ZERO": FAST_ZERO,
        "FUA_NONE": 0,
        "FUA_EMULATE": 1,
        "FUA_NATIVE": 2,
        "CACHE_NONE": 0,
        "CACHE_EMULATE": 1,
        "CACHE_NATIVE": 2,
        "EXTENT_HOLE": int(Extent.HOLE),
        "EXTENT_ZERO": int(Extent.ZERO),
    }.items():
        setattr(m, name, value)
    return m


# Worker threads -------------------------------------------------------------------------------

_Job = tuple[Callable[..., Any], tuple[Any, ...], str | None, bool, "asyncio.Future[Any]"]


class Workers:
    """Daemon threads that run the script's callbacks: an idle one takes the next, a new one
    starts when none is idle (the callers' turns bound how many run). Daemons, so that a
    callback that never returns does not keep the node from exiting."""

    def __init__(self, call: _Call) -> None:
        self.call = call
        self._idle: list[queue.SimpleQueue[_Job | None]] = []
        self._lock = threading.Lock()
        self.threads = 0

    def submit(
        self, fn: Callable[..., Any], args: tuple[Any, ...], export: str | None, tls: bool
    ) -> asyncio.Future[tuple[Any, BaseException | None, int]]:
        """Run fn(*args) on a worker; the future gets (result, exception, set_error's errno)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        with self._lock:
            inbox = self._idle.pop() if self._idle else None
        if inbox is None:
            inbox = queue.SimpleQueue()
            self.threads += 1
            threading.Thread(
                target=self._work, args=(inbox,), name="python-callback", daemon=True
            ).start()
        inbox.put((fn, args, export, tls, future))
        return future

    def _work(self, inbox: queue.SimpleQueue[_Job | None]) -> None:
        call = self.call
        while (job := inbox.get()) is not None:
            fn, args, export, tls, future = job
            call.error, call.export, call.tls = 0, export, tls
            try:
                outcome: tuple[Any, BaseException | None, int] = (fn(*args), None, 0)
            except BaseException as exc:  # sys.exit() too: the script's error
                outcome = (None, exc, call.error)
            call.export = None
            with self._lock:
                self._idle.append(inbox)
            try:
                future.get_loop().call_soon_threadsafe(_settle, future, outcome)
            except RuntimeError:  # the loop is closed: the node has stopped
                return
            del job, fn, args, future, outcome  # keep no buffer or handle alive while idle
        with self._lock:
            self.threads -= 1

    def stop(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for inbox in idle:
            inbox.put(None)


def _settle(future: asyncio.Future[Any], outcome: Any) -> None:
    if not future.done():
        future.set_result(outcome)


# Params and the node's backend ---------------------------------------------------------------


class PythonParams(ScriptParams):
    script: str = param(description="the Python script (nbdkit-python-plugin(3)'s API)", path=True)
    script_timeout: Duration = param(
        60.0,
        "longest a callback may take, its wait for its turn included, before its request "
        "fails with EIO (the callback runs on: Python cannot stop it; 0: no limit, as nbdkit)",
    )


@register
class Python(ClientExports, Plugin):
    """A disk served by a Python script written for nbdkit's python plugin."""

    kind = "python"
    Params = PythonParams
    params: PythonParams
    magic = "script"
    prepares_exports = True

    def __init__(self, params: PythonParams) -> None:
        super().__init__(params)
        self.name = params.script
        self.api = 2
        #: The script's globals: callbacks are looked up at each call, as nbdkit does (a script
        #: may define them as it runs: in config, say).
        self.namespace: dict[str, Any] = {}
        self.gate = Gate()
        self.call_state = _Call()
        self.workers = Workers(self.call_state)
        self._slots = asyncio.Semaphore(MAX_THREADS)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown_asked = False
        self._init_client_exports()
        self._started = False
        self.calls = 0
        self.failures = 0
        self.overdue = 0  #: callbacks running past script-timeout now
        self.last_error = ""

    @classmethod
    def multi_export(cls, params: ParamsModel) -> MultiExport | None:
        return "names"

    # Start-up: on the main thread, as nbdkit ----------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._load()
        self._configure()
        self._startup("config_complete")
        model = self._startup("thread_model")
        if self.has("thread_model"):
            self.gate.model = self._thread_model(model)
        self._startup("get_ready")
        self._startup("after_fork")
        self._started = True
        if self._shutdown_asked:
            await self.stop()
            raise StopNode(f"{self.name}: the script called nbdkit.shutdown() while starting")

    def _load(self) -> None:
        path = self.params.script
        with open(path, "rb") as f:  # OSError: the node says which file and why
            source = f.read()
        module = types.ModuleType("__main__")
        module.__file__ = path
        module.__builtins__ = builtins  # type: ignore[attr-defined]
        sys.modules["nbdkit"] = nbdkit_module(self.call_state, self._shutdown_soon)
        try:
            exec(compile(source, path, "exec"), module.__dict__)
        except BaseException as exc:  # SystemExit at the top too
            raise ScriptError(
                f"{self.name}: error running this script:\n{described(exc)}"
            ) from None
        namespace = module.__dict__
        missing = [n for n in REQUIRED if not callable(namespace.get(n))]
        if missing:
            raise ScriptError(
                f"{self.name}: the script defines no {', '.join(missing)}: the callbacks "
                f"{', '.join(REQUIRED)} are required"
            )
        api = namespace.get("API_VERSION", 1)
        if api not in (1, 2) or isinstance(api, bool):
            raise ScriptError(
                f"{self.name}: API_VERSION requested unknown version: {api!r} (1 and 2 are)"
            )
        self.api = api
        self.namespace = namespace

    def _startup(self, name: str, *args: Any) -> Any:
        fn = self.namespace.get(name)
        if not callable(fn):
            return None
        self.calls += 1
        try:
            return fn(*args)
        except BaseException as exc:
            raise ScriptError(f"{self.name}: {name}: {described(exc)}") from None

    def _configure(self) -> None:
        for key, value in self.params.config_pairs():
            if key == BARE:  # not given by parse_params (no bare words), but by a mapping
                raise ScriptError(f"expected key=value, got {value!r}")
            if not self.has("config"):
                raise ScriptError(
                    f"{self.name}: {key}={value}: the script has no config function, so it "
                    "takes no parameters"
                )
            self._startup("config", key, value)

    def _thread_model(self, value: Any) -> str:
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 4:
            return THREAD_MODELS[value]
        raise ScriptError(
            f"{self.name}: thread_model returned {value!r}, not one of nbdkit.THREAD_MODEL_*"
        )

    def _shutdown_soon(self) -> None:
        """nbdkit.shutdown(), from any thread: the node stops as on SIGTERM."""
        loop = self._loop
        if loop is None or not self._started:
            self._shutdown_asked = True
            return
        loop.call_soon_threadsafe(self._shutdown)

    def _shutdown(self) -> None:
        if self.stop_node is not None:
            self.stop_node()
        else:
            self._shutdown_asked = True

    async def stop(self) -> None:
        await self._close_exports()
        if self.has("cleanup"):
            try:
                await self.run("cleanup")
            except OSError:
                pass  # said in the log; nothing else to do at exit
        self.namespace = {}
        self.workers.stop()

    def capabilities(self) -> Capabilities:
        # The node as a whole (control plane, shutdown): each client's export has its own.
        return Capabilities(size=0)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "api_version": self.api,
            "thread_model": self.gate.model,
            "connections": len(self._open),
            "calls": self.calls,
            "failures": self.failures,
            "overdue": self.overdue,
            "threads": self.workers.threads,
        }
        if self.last_error:
            out["last_error"] = self.last_error
        return out

    # Running callbacks --------------------------------------------------------------------------

    def has(self, name: str) -> bool:
        return callable(self.namespace.get(name))

    async def run(self, name: str, *args: Any, export: str | None = None) -> Any:
        """Call the script's `name` on a worker thread in the turn the thread model gives,
        within script-timeout; its exception becomes OSError (set_error's errno, else EIO).
        (Requests' coroutines may run outside a Task: wait_for, not asyncio.timeout.)"""
        fn = self.namespace.get(name)
        if not callable(fn):  # it was there when asked: the script took it away since
            raise self._failed(name, errno.EIO, "the script has no such function")
        limit = self.params.script_timeout or None
        loop = asyncio.get_running_loop()
        started = loop.time()
        turn = self.gate.turn()
        lock = turn if isinstance(turn, asyncio.Lock) else None
        if (lock is None or not lock.locked()) and not self._slots.locked():
            await self._take_turn(lock)  # free: no wait, no Task
        else:
            try:
                await asyncio.wait_for(self._take_turn(lock), limit)
            except TimeoutError:
                raise self._failed(
                    name,
                    errno.EIO,
                    f"waited {limit:g}s for its turn: a callback before it has not returned "
                    f"(thread model {self.gate.model})",
                ) from None
        self.calls += 1
        future = self.workers.submit(fn, args, export, _client.get().tls)

        def done(_: object) -> None:  # the turn is held until the callback returns
            self._slots.release()
            if lock is not None:
                lock.release()

        future.add_done_callback(done)
        left = None if limit is None else max(0.0, started + limit - loop.time())
        try:
            result, exc, code = await asyncio.wait_for(asyncio.shield(future), left)
        except TimeoutError:
            self.overdue += 1
            future.add_done_callback(self._returned(name))
            raise self._failed(
                name,
                errno.EIO,
                f"no answer within {limit:g}s: it runs on (Python cannot stop it), and keeps "
                "its turn until it returns",
            ) from None
        if exc is not None:
            raise self._failed(name, code or errno.EIO, described(exc))
        return result

    async def _take_turn(self, lock: asyncio.Lock | None) -> None:
        if lock is not None:
            await lock.acquire()
        try:
            await self._slots.acquire()
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    def _returned(self, name: str) -> Callable[[object], None]:
        def note(_: object) -> None:
            self.overdue -= 1
            log.warning("%s: %s: the overdue callback has returned", self.name, name)

        return note

    def _failed(self, name: str, code: int, message: str) -> OSError:
        """The OSError a client gets for a callback that failed (said in the log)."""
        self.failures += 1
        self.last_error = f"{name}: {message.splitlines()[0] if message else ''}"
        log.warning("%s: %s: %s", self.name, name, message)
        return OSError(code, f"{name}: {message.splitlines()[0] if message else 'failed'}")

    # Clients ----------------------------------------------------------------------------------

    async def preconnect(self) -> None:
        await self.gate.admit()
        try:
            if self.has("preconnect"):
                await self.run("preconnect", self.read_only)
        except BaseException:
            self.gate.leave()
            raise

    async def _list(self) -> list[tuple[str, str]]:
        if not self.has("list_exports"):  # the default export alone
            return [(await self._default_name(), "")]
        tls = _client.get().tls
        listed = await self.run("list_exports", self.read_only, tls)
        try:
            return [_export_entry(item) for item in listed]
        except (TypeError, ValueError) as exc:
            raise self._failed("list_exports", errno.EIO, str(exc)) from None

    async def _default_name(self) -> str:
        if not self.has("default_export"):
            return ""
        name = await self.run("default_export", self.read_only, _client.get().tls)
        if not isinstance(name, str):
            raise self._failed("default_export", errno.EIO, f"returned {name!r}, not a string")
        return name[:MAX_STRING]

    async def _open_export(self, requested: str) -> PythonExport:
        name = requested or await self._default_name()
        handle = await self.run("open", self.read_only, export=name)
        export = PythonExport(self, requested, name, handle)
        try:
            await export.learn()
        except BaseException:
            await export.close()
            raise
        return export


def _export_entry(item: Any) -> tuple[str, str]:
    """One item of list_exports' answer: a name, or a (name, description) tuple."""
    if isinstance(item, str):
        return item[:MAX_STRING], ""
    name, description = item
    if not isinstance(name, str) or not isinstance(description, str):
        raise TypeError(f"list_exports: {item!r} is not a name or a (name, description)")
    return name[:MAX_STRING], description[:MAX_STRING]


def _int(method: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OSError(errno.EIO, f"{method} returned {value!r}, not an integer")
    return value


# One client's export --------------------------------------------------------------------------


class PythonExport(OpenedExport, Backend):
    """The export one client opened: its handle, and what the script said of it."""

    owner: Python

    async def call(self, name: str, *args: Any) -> Any:
        return await self.owner.run(name, self.handle, *args, export=self.name)

    async def flag(self, name: str, default: bool) -> bool:
        """A can_* callback's answer, or `default` when the script has none: only True itself
        is true (nbdkit 1.32 compares with Py_True: 1 is false)."""
        return (await self.call(name)) is True if self.owner.has(name) else default

    async def level(self, name: str, default: Support) -> Support:
        """can_fua's or can_cache's answer (NONE, EMULATE or NATIVE)."""
        if not self.owner.has(name):
            return default
        value = await self.call(name)
        if isinstance(value, bool) or value not in (0, 1, 2):
            raise self.owner._failed(name, errno.EIO, f"returned {value!r}, not 0, 1 or 2")
        return Support(value)

    async def learn(self) -> None:
        """Ask the script what the export is, in nbdkit's order (the write side only when
        the export is writable), with nbdkit's python defaults for what it does not say."""
        o = self.owner
        try:
            size = _int("get_size", await self.call("get_size"))
        except OSError as exc:
            raise o._failed("get_size", exc.errno or errno.EIO, exc.strerror or "") from None
        if size < 0:
            raise o._failed("get_size", errno.EIO, f"returned {size}, a negative size")
        writable = fast_zero = trim = False
        zero, fua = Support.NONE, Support.NONE
        if not o.read_only and await self.flag("can_write", o.has("pwrite")):
            writable = True
            native = await self.flag("can_zero", o.has("zero"))
            # Without zeroing of its own, zeros are written: a fast zero fails at once.
            zero = Support.NATIVE if native else Support.EMULATE
            fast_zero = await self.flag("can_fast_zero", not native)
            trim = await self.flag("can_trim", o.has("trim"))
            fua = await self.level("can_fua", Support.EMULATE if o.has("flush") else Support.NONE)
            if o.api == 1:
                fua = min(fua, Support.EMULATE)  # API 1's callbacks take no flags
        flush = await self.flag("can_flush", o.has("flush"))
        rotational = await self.flag("is_rotational", False)
        multi_conn = await self.flag("can_multi_conn", False)
        cache = await self.level("can_cache", Support.NATIVE if o.has("cache") else Support.NONE)
        extents = await self.flag("can_extents", o.has("extents"))
        low = preferred = high = 0
        if o.has("block_size"):
            said = await self.call("block_size")
            try:
                low, preferred, high = (_int("block_size", v) for v in said)
                low, preferred, high = check_block_size(low, preferred, high)
            except (OSError, TypeError, ValueError) as exc:
                raise o._failed("block_size", errno.EIO, f"returned {said!r}: {exc}") from None
        if o.has("export_description"):
            said = await self.call("export_description")
            self.description = str(said)[:MAX_STRING]
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

    async def close(self) -> None:
        """Call close for the handle (once; a failure is only logged, as nbdkit)."""
        if self.closed:
            return
        self.closed = True
        owner = self.owner
        owner._open.discard(self)
        if not owner.has("close"):
            return
        # Run to the end even when the connection's task is cancelled (the node shutting
        # down): stop() waits for it before cleanup.
        closing = asyncio.ensure_future(self._close())
        owner._closing.add(closing)
        closing.add_done_callback(owner._closing.discard)
        await asyncio.shield(closing)

    async def _close(self) -> None:
        try:
            await self.call("close")
        except OSError:
            pass  # said in the log
        self.handle = None

    # Requests ---------------------------------------------------------------------------------

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        n = len(buf)
        if self.owner.api == 1:
            data = await self.call("pread", n, offset)
            try:
                got = memoryview(data).cast("B")
            except TypeError:
                raise self.owner._failed(
                    "pread", errno.EIO, f"returned {type(data).__name__}, not a buffer"
                ) from None
            if len(got) != n:
                raise self.owner._failed(
                    "pread", errno.EIO, f"returned {len(got)} bytes, expected {n}"
                )
            buf[:] = got
            return None
        # A buffer of its own: a callback past script-timeout may still write into it.
        scratch = bytearray(n)
        await self.call("pread", memoryview(scratch), offset, 0)
        buf[:] = scratch
        return None

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        data = memoryview(bytes(buf))  # read-only, as nbdkit's; the node's buffer is reused
        if self.owner.api == 1:
            await self.call("pwrite", data, offset)
        else:
            await self.call("pwrite", data, offset, FUA if flags & _FUA else 0)

    async def flush(self, flags: int) -> None:
        if not self.owner.has("flush"):
            raise OSError(errno.EINVAL, "flush: the script has no flush function")
        await (self.call("flush") if self.owner.api == 1 else self.call("flush", 0))

    async def trim(self, count: int, offset: int, flags: int) -> None:
        if not self.owner.has("trim"):
            raise OSError(errno.EINVAL, "trim: the script has no trim function")
        if self.owner.api == 1:
            await self.call("trim", count, offset)
        else:
            await self.call("trim", count, offset, FUA if flags & _FUA else 0)

    async def zero(self, count: int, offset: int, flags: int) -> None:
        if not self.owner.has("zero"):  # the node writes zeros instead, unless it must be fast
            raise OSError(errno.ENOTSUP, "the script has no zero function")
        may_trim = not flags & _NO_HOLE
        if self.owner.api == 1:
            await self.call("zero", count, offset, may_trim)
            return
        bits = (MAY_TRIM if may_trim else 0) | (FUA if flags & _FUA else 0)
        await self.call("zero", count, offset, bits | (FAST_ZERO if flags & _FAST_ZERO else 0))

    async def cache(self, count: int, offset: int, flags: int) -> None:
        if not self.owner.has("cache"):
            raise OSError(errno.EINVAL, "cache: the script has no cache function")
        await self.call("cache", count, offset, 0)

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        if not self.owner.has("extents"):
            raise OSError(errno.EINVAL, "extents: the script has no extents function")
        said = await self.call("extents", count, offset, REQ_ONE if flags & _REQ_ONE else 0)
        try:
            return extent_list(said, offset, self.caps.size)
        except OSError as exc:
            raise self.owner._failed("extents", errno.EIO, exc.strerror or str(exc)) from None


def extent_list(items: Iterable[Any], offset: int, size: int) -> Extents:
    """extents' answer, (offset, length, type) tuples, as (length, flags) from `offset`: the
    first may start before it, each must start where the one before ended, none counts past
    `size`; zero-length ones are skipped, type bits other than hole and zero dropped (nbdkit's
    rules for nbdkit_add_extent)."""
    try:
        listed = iter(items)
    except TypeError:
        raise OSError(errno.EIO, "extents did not return something which is iterable") from None
    out: Extents = []
    end: int | None = None
    for item in listed:
        try:
            start, length, kind = item
            start, length, kind = _int("extents", start), _int("extents", length), int(kind)
        except (TypeError, ValueError, OSError):
            raise OSError(
                errno.EIO, f"extents: {item!r} is not an (offset, length, type)"
            ) from None
        if end is None and start > offset:
            raise OSError(errno.EIO, f"extents: the first starts at {start}, after {offset}")
        if end is not None and start != end:
            raise OSError(errno.EIO, "extents: each must start where the one before ended")
        if length < 0:
            raise OSError(errno.EIO, f"extents: a negative length ({length})")
        end = start + length
        lo, hi = max(start, offset), min(end, size)
        if hi > lo:
            out.append((hi - lo, kind & _TYPES))
        if end >= size:
            break
    if not out:
        raise OSError(errno.EIO, f"extents: none given from offset {offset}")
    return out
