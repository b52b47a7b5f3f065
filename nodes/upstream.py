"""The libnbd-backed "next": how filters and fans reach the node upstream of them.

One `Upstream` is a small pool of libnbd handles driven by the node's asyncio event loop (no
threads): each handle's fd has a permanent reader, a writer is armed only while libnbd has bytes
to send, and completed commands are retired with `aio_peek_command_completed` +
`aio_command_completed` (no completion callbacks: in libnbd 1.14 every completion callback leaks
a few bytes). When the upstream goes away every request in flight fails with EIO, new requests
fail fast with EIO, and a background task reconnects with exponential back-off. An upstream
that comes back offering less than it first did (smaller, read-only, a flag gone: see
`came_back_short`) is not taken back: it stays down, saying why, until it offers that again.

`nbd.Error` becomes `OSError(errno)` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import logging
import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import nbd

from .base import Backend, Capabilities, Extents, Holes, Support, add_range, shortfalls
from .params import Params
from .protocol import transmission as tx
from .protocol.constants import CmdFlag
from .server.addresses import check_nbd_uri, export_name, with_export
from .server.poll import POLLER
from .server.stream import widen_send_buffer_of

if TYPE_CHECKING:
    from .server.relay import Relay

log = logging.getLogger("nbdfabric.upstream")

#: Requests in flight per libnbd handle (libnbd suggests 64; it queues without bound).
MAX_IN_FLIGHT = 64
#: BLOCK_STATUS requests in flight per handle. Each may cost the upstream milliseconds (a walk
#: and up to thousands of descriptors), and the handles are shared by every client of the node:
#: without a bound, one client's burst of them fills every handle and each other client's
#: request waits behind it upstream. Waiting ones wait here instead. A 4K read of a second
#: client during a burst over a memory node took 124 ms (median), now 6.5 (2 per handle: 15.5;
#: `nbdkit nbd`, with a connection per client: 0.1); the burst's own rate did not change.
STATUS_IN_FLIGHT = 1
#: Handles opened when the upstream advertises multi-conn.
MULTI_CONN_POOL = 4
#: Largest single read/write sent when the upstream advertises no maximum (qemu-nbd's cap).
DEFAULT_MAX_REQUEST = 32 * 1024 * 1024
#: Largest length for one BLOCK_STATUS (u32 on the wire; a power of two keeps it aligned).
MAX_STATUS_LENGTH = 1 << 31
#: Reconnect back-off: first delay, cap.
BACKOFF_FIRST = 0.05
BACKOFF_CAP = 2.0

# Plain ints: `int & IntFlag` runs Python code in enum.py (about 1 µs), on every request.
_FUA, _DF = int(CmdFlag.FUA), int(CmdFlag.DF)
# FUA is valid on a read (the spec has servers accept it on any command once advertised) but
# means nothing there, and libnbd refuses it on pread with EINVAL: only DF goes upstream.
_READ_FLAGS = _DF
_WRITE_FLAGS = _FUA
_ZERO_FLAGS = int(CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO)
_STATUS_FLAGS = int(CmdFlag.REQ_ONE)
_DIR_READ, _DIR_WRITE = nbd.AIO_DIRECTION_READ, nbd.AIO_DIRECTION_WRITE


@dataclass
class Catalog:
    """What an upstream says about its exports without opening one (see Upstream.catalog)."""

    exports: list[tuple[str, str]]  #: NBD_OPT_LIST: (name, description)
    list_error: str  #: why the list was refused ("" if it was not)
    default_name: str  #: the canonical name of the export the URI names


T = TypeVar("T")


class UpstreamDown(OSError):
    """The upstream connection is gone (or not yet back): the request fails with EIO."""


def _os_error(exc: nbd.Error, uri: str) -> OSError:
    code = exc.errnum or errno.EIO
    if code in (errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE, errno.ESHUTDOWN):
        return UpstreamDown(errno.EIO, f"upstream {uri}: connection lost ({exc.string})")
    return OSError(code, f"upstream {uri}: {exc.string}")


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[Any]
    result: Any = None  #: holes (reads) or extents (block status), filled by chunk callbacks


_LIBNBDMOD = getattr(nbd, "libnbdmod", None)


class _Calls:
    """The libnbd calls made per request on one handle. Each method of nbd.NBD is a generated
    Python wrapper that passes its arguments on to the C extension (`libnbdmod`) with the handle
    (`_o`); six of them run per request, so with the libnbd we checked that on (1.14) they are
    bound to the C functions directly. Anything else gets the public methods."""

    __slots__ = (
        "complete", "direction", "notify_read", "notify_write", "peek", "pread", "pwrite",
        "readable",
    )  # fmt: skip

    def __init__(self, h: nbd.NBD) -> None:
        # readable(0): the handle's socket has bytes to read now (poll, no wait).
        watch = select.poll()
        watch.register(h.aio_get_fd(), select.POLLIN)
        self.readable = watch.poll
        mod, o = _LIBNBDMOD, getattr(h, "_o", None)
        if mod is None or o is None or not h.get_version().startswith("1.14."):
            self.notify_read, self.notify_write = h.aio_notify_read, h.aio_notify_write
            self.peek, self.complete = h.aio_peek_command_completed, h.aio_command_completed
            self.direction = h.aio_get_direction
            self.pread, self.pwrite = h.aio_pread_structured, h.aio_pwrite
            return
        self.notify_read = functools.partial(mod.aio_notify_read, o)
        self.notify_write = functools.partial(mod.aio_notify_write, o)
        self.peek = functools.partial(mod.aio_peek_command_completed, o)
        self.complete = functools.partial(mod.aio_command_completed, o)
        self.direction = functools.partial(mod.aio_get_direction, o)
        self.pread = functools.partial(mod.aio_pread_structured, o)
        self.pwrite = functools.partial(mod.aio_pwrite, o)


@dataclass(slots=True)
class _Conn:
    """One libnbd handle registered with the event loop."""

    h: nbd.NBD
    fd: int
    calls: _Calls
    pending: dict[int, _Pending] = field(default_factory=dict)
    #: Requests waiting for a free place when MAX_IN_FLIGHT are already out on this handle.
    queue: collections.deque[asyncio.Future[None]] = field(default_factory=collections.deque)
    writing: bool = False
    dead: bool = False


def came_back_short(was: Capabilities, now: Capabilities) -> str:
    """What an upstream that reconnected lacks of what it offered before ("" if nothing; the
    rule is `shortfalls`). Clients of this node (and of the nodes downstream) negotiated with
    the old offer. nbdkit's retry filter refuses a reopened plugin whose size changed likewise."""
    lost = []
    for s in shortfalls(was, now):
        if s.what == "size":
            lost.append(f"{s.now} bytes, was {s.was}")
        elif s.was is not None:
            lost.append(f"{s.what} {s.now}, was {s.was}")
        else:
            lost.append(f"no {s.what}")
    return ", ".join(lost)


class Upstream(Backend):
    """An NBD server reached through libnbd, presented as a Backend."""

    kind = "upstream"
    role = "upstream"

    def __init__(
        self,
        uri: str,
        *,
        name: str = "",
        tls_certificates: str | None = None,
        tls_verify: bool = True,
        connect_timeout: float = 30.0,
        pool_size: int = MULTI_CONN_POOL,
        full_info: bool = False,
    ) -> None:
        super().__init__(Params())
        check_nbd_uri(uri)  # `--upstream disk.img`, ReplaceMember with `http://`: say so now
        self.uri = uri
        self.name = name or uri
        self.tls_certificates = tls_certificates
        self.tls_verify = tls_verify
        self.connect_timeout = connect_timeout
        self.pool_size = max(1, pool_size)
        #: Ask for the export's canonical name and description (NBD_INFO_NAME, _DESCRIPTION).
        self.full_info = full_info
        self.canonical_name = export_name(uri)  #: as the upstream names it, once connected
        self.description = ""
        self.state = "connecting"  #: up | down | connecting
        self.reconnects = 0
        #: The relays (server/relay.py) with a connection of their own to this upstream.
        self.relays: set[Relay] = set()
        self.last_error = ""
        self._conns: list[_Conn] = []
        self._turn = 0
        self._caps = Capabilities(size=0)
        #: What the first connection offered: what this node may have promised its clients.
        self._promised: Capabilities | None = None
        self._max_request = DEFAULT_MAX_REQUEST
        self._read_flags = 0  #: what reads may carry upstream (set per connection)
        self._reconnect_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()  #: cut the reconnect back-off short (see reconnect())
        self._attempted = asyncio.Event()  #: set after each reconnect attempt
        #: The readiness handler: the plain one, or the one that tells the poller (poll.py).
        self._on_event: Callable[[_Conn, Callable[[], object]], None] = self._on_ready
        self._status_slots: asyncio.Semaphore | None = None  #: made on the node's loop
        #: Meta contexts to ask for besides base:allocation (the nbd filter's `context`), and
        #: those of them the upstream agreed to (contexts()).
        self.wanted_contexts: tuple[str, ...] = ()
        self._contexts: tuple[str, ...] = ()
        #: Without wanted_contexts: ask for every meta context the upstream lists at the first
        #: connection, and keep asking for those (a filter that passes them on sets it).
        self.all_contexts = False
        self._listed = False

    # Lifecycle ----------------------------------------------------------------------------

    def _bind_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._status_slots = asyncio.Semaphore(STATUS_IN_FLIGHT * self.pool_size)
        if POLLER.enabled:
            self._on_event = self._on_ready_polled

    async def start(self) -> None:
        self._bind_loop()
        deadline = time.monotonic() + self.connect_timeout
        delay = BACKOFF_FIRST
        while True:
            try:
                await self._connect()
                return
            except OSError as exc:
                self.last_error = str(exc)
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping:
                    raise OSError(
                        errno.EHOSTUNREACH,
                        f"cannot connect to upstream {self.uri} within "
                        f"{self.connect_timeout:g}s: {exc.strerror or exc}",
                    ) from None
                if delay == BACKOFF_FIRST:  # once: the node is not hung, it is waiting
                    log.warning("%s: cannot connect to upstream %s yet (%s); trying for %.0f s "
                                "more", self.name, self.uri, exc.strerror or exc, left)  # fmt: skip
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, BACKOFF_CAP)

    async def connect_once(self) -> None:
        """Connect now, without retrying: for an export opened while a client waits for it
        (exportname), where a refusal is the answer to give, not a reason to wait."""
        self._bind_loop()
        try:
            await self._connect()
        except OSError as exc:
            self.state, self.last_error = "down", str(exc)
            raise

    def sibling(self, export: str) -> Upstream:
        """An upstream for export `export` of the same server, connected as this one is."""
        return Upstream(
            with_export(self.uri, export),
            name=f"{self.name}/{export}" if export else self.name,
            tls_certificates=self.tls_certificates,
            tls_verify=self.tls_verify,
            connect_timeout=self.connect_timeout,
            pool_size=self.pool_size,
            full_info=True,
        )

    async def catalog(self) -> Catalog:
        """The server's export list and the canonical name of the URI's export, asked in one
        short negotiation (libnbd's option mode) that opens no export."""
        h = self._new_handle()
        h.set_opt_mode(True)
        h.set_full_info(True)
        default = export_name(self.uri)

        def ask() -> Catalog:
            h.connect_uri(self.uri)
            listed: list[tuple[str, str]] = []
            refused = ""

            def found(name: str, description: str) -> int:
                listed.append((name, description))
                return 0

            try:
                h.opt_list(found)
            except nbd.Error as exc:
                refused = exc.string
            canonical = default
            with contextlib.suppress(nbd.Error):  # a server may refuse its default export
                h.opt_info()
                canonical = h.get_canonical_export_name()
            with contextlib.suppress(nbd.Error):
                h.opt_abort()
            return Catalog(listed, refused, canonical)

        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(None, ask), self.connect_timeout)
        except nbd.Error as exc:
            raise OSError(exc.errnum or errno.ECONNREFUSED, exc.string) from None
        except TimeoutError:
            raise OSError(errno.ETIMEDOUT, f"{self.uri}: no answer to NBD_OPT_LIST") from None

    def start_in_background(self) -> None:
        """After start() gave up: keep trying, with back-off, without holding the node up (a
        mirror serves without this member meanwhile and takes it in when it connects)."""
        self._loop = asyncio.get_running_loop()
        self.state = "down"
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = self._loop.create_task(self._reconnect())

    async def stop(self) -> None:
        self._stopping = True
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnect_task
        self._drop_all("the node is stopping")
        self.state = "down"

    def healthy(self) -> bool:
        return self.state == "up"

    def status(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "uri": self.uri,
            "name": self.name,
            "state": self.state,
            "reconnects": self.reconnects,
            "connections": len(self._conns),
            "in_flight": sum(len(c.pending) for c in self._conns),
        }
        if self.last_error and self.state != "up":
            entry["error"] = self.last_error
        if self.relays:
            entry["relayed"] = {
                "clients": len(self.relays),
                "down": sum(r.up_state != "up" for r in self.relays),
                "in_flight": sum(r.in_flight for r in self.relays),
            }
        return {"upstreams": [entry]}

    def capabilities(self) -> Capabilities:
        return self._caps

    # Connecting ---------------------------------------------------------------------------

    def _new_handle(self) -> nbd.NBD:
        h = nbd.NBD()
        h.set_pread_initialize(False)
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        for context in self.wanted_contexts:
            h.add_meta_context(context)
        # Bounds are the upstream's business: let it answer (ENOSPC vs EINVAL) with its errno.
        h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_BOUNDS)
        if self.uri.startswith("nbds"):
            h.set_tls(nbd.TLS_REQUIRE)
        if self.tls_certificates:
            h.set_tls_certificates(self.tls_certificates)
        h.set_tls_verify_peer(self.tls_verify)
        h.set_full_info(self.full_info)
        return h

    async def _open_one(self) -> nbd.NBD:
        """Connect one handle. The blocking handshake runs in a worker thread (it releases the
        GIL); afterwards the handle is only touched from the event loop."""
        h = self._new_handle()
        if self.all_contexts and not self.wanted_contexts and not self._listed:
            await self.connect_in_thread(functools.partial(self._connect_listing, h))
        else:
            await self.connect_in_thread(functools.partial(h.connect_uri, self.uri))
        return h

    async def connect_in_thread(self, connect: Callable[[], T]) -> T:
        """`connect()` (a blocking libnbd handshake) in a worker thread, within
        connect_timeout; its failure as OSError."""
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(None, connect), self.connect_timeout)
        except nbd.Error as exc:
            raise OSError(exc.errnum or errno.ECONNREFUSED, exc.string) from None
        except TimeoutError:
            raise OSError(errno.ETIMEDOUT, "connection timed out") from None

    def _connect_listing(self, h: nbd.NBD) -> None:
        """Connect `h` asking, in the same handshake, for every meta context the upstream lists
        (NBD_OPT_LIST_META_CONTEXT with no query) and then for all of them; they become
        wanted_contexts, asked for by name on every later connection."""
        h.set_opt_mode(True)
        h.connect_uri(self.uri)
        listed: list[str] = []

        def found(name: str) -> int:
            listed.append(name)
            return 0

        if h.get_structured_replies_negotiated():
            h.clear_meta_contexts()
            with contextlib.suppress(nbd.Error):  # a server without meta contexts: none
                h.opt_list_meta_context(found)
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
            for name in listed:
                if name != nbd.CONTEXT_BASE_ALLOCATION:
                    h.add_meta_context(name)
        h.opt_go()
        self.wanted_contexts = tuple(n for n in listed if n != nbd.CONTEXT_BASE_ALLOCATION)
        self._listed = True

    async def _connect(self) -> None:
        self.state = "connecting"
        first = await self._open_one()
        handles = [first]
        if first.can_multi_conn():
            for _ in range(self.pool_size - 1):
                try:
                    handles.append(await self._open_one())
                except OSError:
                    break  # a smaller pool still works
        caps = self._read_caps(first)
        short = came_back_short(self._promised, caps) if self._promised else ""
        if short:
            for h in handles:
                with contextlib.suppress(nbd.Error):
                    h.aio_disconnect(0)
            raise OSError(errno.EIO, f"came back with less than it offered ({short}): not "
                          f"taken back until it offers that again")  # fmt: skip
        self._caps = caps
        self._contexts = tuple(c for c in self.wanted_contexts if first.can_meta_context(c))
        self._promised = self._promised or caps
        if self.full_info:
            self._read_identity(first)
        # The read flags the upstream may be sent: DF only if it has it.
        self._read_flags = _READ_FLAGS if first.can_df() else 0
        maximum = first.get_block_size(nbd.SIZE_MAXIMUM)
        self._max_request = min(maximum or DEFAULT_MAX_REQUEST, DEFAULT_MAX_REQUEST * 2)
        minimum = first.get_block_size(nbd.SIZE_MINIMUM) or 1
        self._max_request -= self._max_request % minimum
        loop = asyncio.get_running_loop()
        for h in handles:
            conn = _Conn(h, h.aio_get_fd(), _Calls(h))
            widen_send_buffer_of(conn.fd)  # big writes go upstream in one piece
            loop.add_reader(conn.fd, self._on_event, conn, conn.calls.notify_read)
            POLLER.watch(conn.fd)
            self._conns.append(conn)
        self.state = "up"
        self.last_error = ""
        log.info("%s: connected to %s (%d handle(s))", self.name, self.uri, len(handles))

    def _read_identity(self, h: nbd.NBD) -> None:
        """The export's canonical name and description, where the server sent them."""
        with contextlib.suppress(nbd.Error):
            self.canonical_name = h.get_canonical_export_name()
        try:
            self.description = h.get_export_description()
        except nbd.Error:
            self.description = ""

    @staticmethod
    def _read_caps(h: nbd.NBD) -> Capabilities:
        writable = not h.is_read_only()
        flush = bool(h.can_flush())
        if h.can_fua():
            fua = Support.NATIVE
        elif flush:
            fua = Support.EMULATE  # the session flushes after the write
        else:
            fua = Support.NONE
        # Without native zero, the session writes zero buffers.
        zero = Support.NATIVE if h.can_zero() else Support.EMULATE
        return Capabilities(
            size=h.get_size(),
            writable=writable,
            flush=flush,
            fua=fua,
            trim=bool(h.can_trim()),
            zero=zero,
            fast_zero=bool(h.can_zero() and h.can_fast_zero()),
            # An upstream without CACHE still gets its hint, as a read (the session's
            # emulation): that warms every cache-on-read filter and page cache below, so a
            # scan or a client's CACHE works through any chain. nbdkit's nbd plugin says
            # can_cache=none here; a chain that must not be read ahead has no scan in it.
            cache=Support.NATIVE if h.can_cache() else Support.EMULATE,
            extents=bool(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)),
            multi_conn=bool(h.can_multi_conn()),
            rotational=bool(h.is_rotational()),
            block_min=h.get_block_size(nbd.SIZE_MINIMUM),
            block_preferred=h.get_block_size(nbd.SIZE_PREFERRED),
            block_max=h.get_block_size(nbd.SIZE_MAXIMUM),
        ).normalized()

    def _lost(self, why: str) -> None:
        """The upstream went away: fail everything in flight and reconnect in the background."""
        if self.state == "down" or self._stopping:
            return
        log.warning("%s: upstream %s lost: %s", self.name, self.uri, why)
        self.last_error = why
        self._drop_all(why)
        self.state = "down"
        if self._reconnect_task is None or self._reconnect_task.done():
            loop = self._loop or asyncio.get_running_loop()
            self._reconnect_task = loop.create_task(self._reconnect())

    def _drop_all(self, why: str) -> None:
        conns, self._conns = self._conns, []
        for conn in conns:
            self._close(conn, why)

    def _close(self, conn: _Conn, why: str) -> None:
        conn.dead = True
        loop = self._loop
        POLLER.unwatch(conn.fd)
        if loop is not None and not loop.is_closed():
            loop.remove_reader(conn.fd)
            if conn.writing:
                loop.remove_writer(conn.fd)
        conn.writing = False
        pending, conn.pending = conn.pending, {}
        for p in pending.values():
            if not p.future.done():
                p.future.set_exception(
                    UpstreamDown(errno.EIO, f"upstream {self.uri} is down: {why}")
                )
        queue, conn.queue = conn.queue, collections.deque()
        for waiter in queue:
            if not waiter.done():
                waiter.set_result(None)  # it finds the handle dead and fails with EIO
        with contextlib.suppress(nbd.Error):
            conn.h.aio_disconnect(0)
        # The handle closes (and its socket with it) when its last reference goes.

    async def _reconnect(self) -> None:
        delay = BACKOFF_FIRST
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()
            self.state = "connecting"
            try:
                await self._connect()
                self.reconnects += 1
                log.warning("%s: upstream %s is back", self.name, self.uri)
                return
            except OSError as exc:
                self.last_error = str(exc)
                self.state = "down"
                delay = min(delay * 2, BACKOFF_CAP)
            finally:
                self._attempted.set()

    async def reconnect(self) -> None:
        """Reopen, for the retry filter. A live connection is kept: an error it carried was the
        upstream's answer, and dropping the pool would fail every other request in flight. A lost
        one is tried again now instead of at the next back-off step; OSError(EIO) if still down."""
        task = self._reconnect_task
        if self.state == "up" or self._stopping or task is None or task.done():
            return
        self._attempted.clear()
        self._wake.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._attempted.wait(), self.connect_timeout)
        if self.state != "up":
            raise OSError(errno.EIO, f"upstream {self.uri} is still down: {self.last_error}")

    # Driving libnbd from the event loop ---------------------------------------------------

    def _on_ready(self, conn: _Conn, notify: Callable[[], object]) -> None:
        """The socket is ready in the direction `notify` (libnbd's aio_notify_read or _write)
        tells libnbd about."""
        if conn.dead:
            return
        try:
            notify()
            calls = conn.calls
            if notify is not calls.notify_read:
                self._reap(conn)
            else:
                # libnbd reads one reply per aio_notify_read. While each one completes a
                # command, others are out and the socket holds more, read on now rather than
                # one reply per turn of the event loop. Only while it holds more: libnbd 1.14
                # told to read from an empty socket waits in REPLY.START, and sends no new
                # command until a reply comes (none may: a deadlock when none is out).
                for _ in range(MAX_IN_FLIGHT):
                    if not self._reap(conn) or not conn.pending or not calls.readable(0):
                        break
                    notify()
                else:
                    self._reap(conn)
        except nbd.Error as exc:
            self._reap(conn)
            self._lost(exc.string)
            return
        self._after_io(conn)

    def _on_ready_polled(self, conn: _Conn, notify: Callable[[], object]) -> None:
        """The same, telling the poller (--poll-max-us) when the loop wakes and when it may poll."""
        POLLER.woke()
        self._on_ready(conn, notify)
        assert self._loop is not None
        POLLER.idle_soon(self._loop)

    def _after_io(self, conn: _Conn) -> None:
        """After libnbd did I/O (and what completed was reaped): watch the directions it wants."""
        h = conn.h
        direction = conn.calls.direction()
        # A live handle always waits to read (READY or mid-reply); only a dead or closed one
        # waits for nothing, so the two extra checks run only then.
        if not direction & _DIR_READ and (h.aio_is_dead() or h.aio_is_closed()):
            self._lost("the connection closed")
            return
        self._set_writer(conn, bool(direction & _DIR_WRITE))

    def _update_writer(self, conn: _Conn) -> None:
        self._set_writer(conn, bool(conn.calls.direction() & _DIR_WRITE))

    def _set_writer(self, conn: _Conn, want: bool) -> None:
        if want != conn.writing:
            loop = self._loop
            assert loop is not None
            if want:
                loop.add_writer(conn.fd, self._on_event, conn, conn.calls.notify_write)
            else:
                loop.remove_writer(conn.fd)
            conn.writing = want

    def _reap(self, conn: _Conn) -> int:
        """Retire every completed command and settle its future (by value, outside callbacks);
        how many there were."""
        calls = conn.calls
        retired = 0
        while conn.pending:
            try:
                cookie = calls.peek()
            except nbd.Error:
                return retired
            if cookie <= 0:
                return retired
            retired += 1
            p = conn.pending.pop(cookie, None)
            try:
                calls.complete(cookie)
                if p is not None and not p.future.done():
                    p.future.set_result(p.result)
            except nbd.Error as exc:
                if p is not None and not p.future.done():
                    p.future.set_exception(_os_error(exc, self.uri))
            self._wake_one(conn)
        return retired

    @staticmethod
    def _wake_one(conn: _Conn) -> None:
        """A place is free on this handle: let the longest-waiting request issue."""
        queue = conn.queue
        while queue:
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    # Issuing ------------------------------------------------------------------------------

    def _pick(self) -> _Conn:
        if self.state != "up" or not self._conns:
            raise UpstreamDown(errno.EIO, f"upstream {self.uri} is {self.state}")
        conns = self._conns
        if len(conns) == 1:
            return conns[0]
        # Round robin: the handles lead to the same server, and it is O(1) per request.
        self._turn = turn = (self._turn + 1) % len(conns)
        return conns[turn]

    async def _run(self, issue: Any, result: Any = None) -> Any:
        """Issue one command with `issue(conn)` -> cookie and wait for it to complete.

        The caller's buffer stays lent to libnbd until the command completes, even if the
        waiting task is cancelled (so a pooled buffer is never reused under libnbd's feet).
        """
        conn = self._pick()
        loop = self._loop or asyncio.get_running_loop()
        while len(conn.pending) >= MAX_IN_FLIGHT and not conn.dead:
            waiter: asyncio.Future[None] = loop.create_future()
            conn.queue.append(waiter)
            try:
                await waiter  # cancelled here: never issued, nothing lent
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one(conn)  # the place we were given goes to the next one
                raise
        if conn.dead:
            raise UpstreamDown(errno.EIO, f"upstream {self.uri} is {self.state}")
        fut: asyncio.Future[Any] = loop.create_future()
        try:
            cookie = issue(conn)
        except nbd.Error as exc:
            if conn.h.aio_is_dead() or conn.h.aio_is_closed():
                # The handle died under this call (libnbd then says EINVAL: "invalid state:
                # DEAD"): the upstream is lost, and the request fails as lost ones do.
                self._lost(exc.string)
                raise UpstreamDown(errno.EIO, f"upstream {self.uri}: {exc.string}") from None
            raise _os_error(exc, self.uri) from None
        pending = conn.pending[cookie] = _Pending(fut, result)
        self._update_writer(conn)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.cancelled() and conn.pending.get(cookie) is pending:
                # Our task was cancelled while libnbd still holds the buffer: wait it out.
                pending.future = loop.create_future()
                await _finish_despite_cancel(pending.future)
            raise

    # Data operations ----------------------------------------------------------------------

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        flags &= self._read_flags
        if len(buf) > self._max_request:
            return await self._pread_split(buf, offset, flags)
        holes: list[tuple[int, int]] = []
        expect = offset  # chunks in order so far cover offset..expect
        spans: list[tuple[int, int]] | None = None  # what they cover, once one is not in order
        refused = False

        def chunk(sub: memoryview, off: int, status: int, err: Any) -> int:
            # libnbd checks no overlap between chunks, and leaves bytes they miss as they were
            # (pread_initialize is off): the last request's, maybe another client's.
            nonlocal expect, spans, refused
            n = len(sub)
            if off == expect and spans is None and n:
                expect += n
            elif status != nbd.READ_ERROR:
                if spans is None:
                    spans = [(offset, expect)] if expect > offset else []
                if refused or not n or not tx.cover(spans, off, off + n):
                    if not refused:
                        log.warning("upstream %s: a READ's reply chunks overlap, or one is "
                                    "empty (%d bytes at %d)", self.uri, n, off)  # fmt: skip
                    refused = True
                    err.value = errno.EIO
                    return -1
            if status == nbd.READ_HOLE:
                holes.append((off - offset, n))
            return 0

        await self._run(lambda c: c.calls.pread(buf, offset, chunk, None, flags))
        if len(holes) > 1:
            holes.sort()
        return holes

    async def _pread_split(self, buf: memoryview, offset: int, flags: int) -> Holes:
        """A read larger than the upstream takes at once, as several reads in flight."""
        step = self._max_request
        starts = range(0, len(buf), step)
        got = await _gather([self.pread(buf[p : p + step], offset + p, flags) for p in starts])
        holes: list[tuple[int, int]] = []
        for p, part in zip(starts, got, strict=True):
            for start, length in part or ():
                add_range(holes, p + start, length)  # one hole across a seam, not two
        return holes

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        flags &= _WRITE_FLAGS
        step = self._max_request
        if len(buf) > step:  # as several writes in flight
            await _gather(
                [
                    self.pwrite(buf[p : p + step], offset + p, flags)
                    for p in range(0, len(buf), step)
                ]
            )
            return
        await self._run(lambda c: c.calls.pwrite(buf, offset, None, flags))

    async def flush(self, flags: int) -> None:
        if not self._caps.flush:
            return  # nothing to make persistent: the upstream has no write cache to flush
        await self._run(lambda c: c.h.aio_flush(None, 0))

    async def trim(self, count: int, offset: int, flags: int) -> None:
        flags &= _FUA
        await self._run(lambda c: c.h.aio_trim(count, offset, None, flags))

    async def zero(self, count: int, offset: int, flags: int) -> None:
        flags &= _ZERO_FLAGS
        await self._run(lambda c: c.h.aio_zero(count, offset, None, flags))

    async def cache(self, count: int, offset: int, flags: int) -> None:
        if self._caps.cache is not Support.NATIVE:
            return  # a hint only; the session emulates CACHE by reading when we say EMULATE
        await self._run(lambda c: c.h.aio_cache(count, offset, None, 0))

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        if not self._caps.extents:
            return [(count, 0)]
        return await self._block_status(nbd.CONTEXT_BASE_ALLOCATION, count, offset, flags)

    def contexts(self) -> tuple[str, ...]:
        return self._contexts

    async def context_extents(self, context: str, count: int, offset: int, flags: int) -> Extents:
        if context not in self._contexts:
            return await super().context_extents(context, count, offset, flags)
        return await self._block_status(context, count, offset, flags)

    async def _block_status(self, context: str, count: int, offset: int, flags: int) -> Extents:
        """The upstream's answer in meta context `context` (its other contexts' are dropped)."""
        count = min(count, MAX_STATUS_LENGTH)
        flags &= _STATUS_FLAGS
        out: list[tuple[int, int]] = []

        def extent(meta: str, off: int, entries: list[int], err: Any) -> int:
            if meta == context:
                if out:  # a second chunk for the context: whose bytes would its extents be?
                    err.value = errno.EIO
                    log.warning("upstream %s: a second status chunk for %s", self.uri, meta)
                    return -1
                out.extend(zip(entries[::2], entries[1::2], strict=True))
            return 0

        slots = self._status_slots
        assert slots is not None  # bound by start() or connect_once(), before any request
        async with slots:
            await self._run(lambda c: c.h.aio_block_status(count, offset, extent, None, flags))
        if not out:
            what = "extents" if context == nbd.CONTEXT_BASE_ALLOCATION else f"{context} extents"
            raise OSError(errno.EIO, f"upstream {self.uri} returned no {what}")
        return out


async def _finish_despite_cancel(fut: asyncio.Future[Any]) -> None:
    """Wait for `fut` to settle, whatever cancellations arrive meanwhile (they were already
    noted by the caller, which re-raises CancelledError afterwards)."""
    while not fut.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(fut)
    if not fut.cancelled():
        fut.exception()  # retrieved: an error after the cancel is not worth a warning


async def _gather(aws: list[Any]) -> list[Any]:
    """Run pieces concurrently; the first error wins once all of them have finished."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def replacement(old: Backend, uri: str, name: str) -> Upstream:
    """The new member of a fan's ReplaceMember, connected as the member it replaces was: with
    the node's --upstream-timeout and --upstream-tls-certificates. With the defaults instead, a
    replace onto an unreachable address held the RPC for 30 s, past `ctl`'s 10 s deadline
    (reported as "cannot reach the node"), and an nbds:// member had no certificates."""
    if isinstance(old, Upstream):
        return Upstream(
            uri,
            name=name,
            tls_certificates=old.tls_certificates,
            tls_verify=old.tls_verify,
            connect_timeout=old.connect_timeout,
        )
    return Upstream(uri, name=name)
