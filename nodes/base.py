"""What every node kind is made of: the backend interface, capabilities, and the three roles.

A backend answers the NBD operations for one export (a backend that serves several, file dir=,
gives each its own: exports() and for_export()). Plugins own their data, filters wrap
`self.next`, fans combine `self.members`. Methods are named after the operations (as nbdkit's
callbacks) and signal failure by raising `OSError(errno.X, message)`. Every method is async so
that a backend may wait on I/O; a backend that never waits simply does not await anything.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Any, ClassVar, Literal, NamedTuple, Protocol

from .params import Params as ParamsModel
from .params import update_params
from .protocol.constants import CmdFlag, Extent, TFlag

#: A read's holes: (start relative to the buffer, length) ranges that read as zeros and whose
#: bytes in the buffer were not filled. `None` or an empty list means "all data".
Holes = list[tuple[int, int]] | None
#: Extents as (length, base:allocation flags), starting at the requested offset, contiguous.
Extents = list[tuple[int, int]]
#: A piece of a lent read: a view of the backend's own bytes, or a hole of that many zero bytes.
Piece = memoryview | int
#: What a node that serves several exports, chosen by name, serves (see Backend.multi_export):
#: "directory" (file dir=, one export per file), "names" (exportname: the names it maps onto
#: its upstream's exports; "" among them), "on-demand" (tmpdisk, ondemand: an export made for
#: the name a client asks for, "" among them).
MultiExport = Literal["directory", "names", "on-demand"]


class Support(IntEnum):
    """How an operation is provided (nbdkit's tri-state for fua, zero and cache)."""

    NONE = 0
    EMULATE = 1  #: the server does it with other operations (flush after write, write zeros)
    NATIVE = 2


@dataclass(frozen=True)
class Capabilities:
    size: int
    writable: bool = False
    flush: bool = False
    fua: Support = Support.NONE
    trim: bool = False
    zero: Support = Support.NONE
    fast_zero: bool = False
    cache: Support = Support.NONE
    extents: bool = False
    multi_conn: bool = False
    rotational: bool = False
    block_min: int = 0  #: 0: no constraints advertised
    block_preferred: int = 0
    block_max: int = 0
    #: The session refuses (EINVAL) requests that break block_min or block_max before the
    #: backend sees them. False lets them through (blocksize-policy's error-policy=allow).
    enforce_block_size: bool = True
    #: A WRITE longer than this disconnects the client before its payload is read (0: never;
    #: blocksize-policy's blocksize-write-disconnect).
    write_disconnect: int = 0

    def normalized(self) -> Capabilities:
        """Write-derived capabilities are off when writing is (nbdkit's backend.c rule)."""
        if self.writable:
            if self.zero is Support.NONE and self.fast_zero:
                return replace(self, fast_zero=False)
            return self
        return replace(self, fua=Support.NONE, trim=False, zero=Support.NONE, fast_zero=False)

    def tflags(self) -> TFlag:
        f = TFlag.HAS_FLAGS | TFlag.SEND_DF  # reads can always be sent unfragmented
        if not self.writable:
            f |= TFlag.READ_ONLY
        if self.flush:
            f |= TFlag.SEND_FLUSH
        if self.fua is not Support.NONE:
            f |= TFlag.SEND_FUA
        if self.trim:
            f |= TFlag.SEND_TRIM
        if self.zero is not Support.NONE:
            f |= TFlag.SEND_WRITE_ZEROES
            if self.fast_zero:
                f |= TFlag.SEND_FAST_ZERO
        if self.cache is not Support.NONE:
            f |= TFlag.SEND_CACHE
        if self.multi_conn:
            f |= TFlag.CAN_MULTI_CONN
        if self.rotational:
            f |= TFlag.ROTATIONAL
        return f

    def as_dict(self) -> dict[str, Any]:
        return {
            k: (v.name.lower() if isinstance(v, Support) else v) for k, v in self.__dict__.items()
        }


class Shortfall(NamedTuple):
    """One thing an offer lacks of an earlier one: a number that got worse (`was`, `now`), or,
    without numbers, a feature gone."""

    what: str
    was: int | None = None
    now: int | None = None


def shortfalls(was: Capabilities, now: Capabilities) -> list[Shortfall]:
    """What the offer `now` lacks of the offer `was` (empty if nothing): the one rule for "offers
    less". Clients that negotiated with `was` would have their requests fail (EINVAL), or worse,
    write where there is no longer room: a smaller export, a larger minimum block size, or a
    flag gone. What a node works round by itself (extents, multi-conn, DF, a smaller maximum
    block size) may change. An upstream that reconnects offering less is not taken back
    (nodes/upstream.py); the orchestrator restarts the dependents of a node that does."""
    lost = []
    if now.size < was.size:
        lost.append(Shortfall("size", was.size, now.size))
    if now.block_min > was.block_min:
        lost.append(Shortfall("minimum block size", was.block_min, now.block_min))
    for name, gone in (
        ("writable", was.writable and not now.writable),
        ("flush", was.flush and not now.flush),
        ("FUA", was.fua is Support.NATIVE and now.fua is not Support.NATIVE),
        ("trim", was.trim and not now.trim),
        ("zero", was.zero is Support.NATIVE and now.zero is not Support.NATIVE),
        ("fast zero", was.fast_zero and not now.fast_zero),
        ("cache", was.cache is Support.NATIVE and now.cache is not Support.NATIVE),
    ):
        if gone:
            lost.append(Shortfall(name))
    return lost


@dataclass
class ClientInfo:
    """Who is asking; set for the duration of each request (see `current_client`)."""

    address: str = ""
    export_name: str = ""
    connection_id: int = 0
    tls: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    #: A unix-socket client's (pid, uid, gid) from SO_PEERCRED; None elsewhere or if unknown.
    peer_credentials: tuple[int, int, int] | None = None


#: The client on whose behalf the current request runs (for per-client filters, `info`).
current_client: ContextVar[ClientInfo] = ContextVar(
    "current_client",
    default=ClientInfo(),  # noqa: B039 (never mutated: sessions set their own)
)


class NodeControl(Protocol):
    """What a backend may steer of the node that serves it (the node runtime): its pause, as
    `nbdfabric ctl ADDR pause|resume` steers it (the pause filter's control socket does)."""

    #: New requests are held until resume.
    paused: bool
    #: The node is shutting down (it cannot be paused any more).
    draining: bool

    @property
    def held(self) -> int:
        """Requests waiting for resume."""
        ...

    async def pause(self, flush: bool = False) -> None:
        """Hold new requests; return once those in flight have finished. RuntimeError while
        the node shuts down."""
        ...

    def resume(self) -> None:
        """Release the held requests; new ones go on at once."""
        ...


class StopNode(Exception):
    """Raised by a backend's start(): the node exits at once with status 0, having served
    nobody (exitwhen, when its event happened before the node started: nbdkit exits so)."""


def unsupported(what: str) -> OSError:
    return OSError(errno.EINVAL, f"{what} is not supported by this node")


class Backend:
    """The operations of one export. Subclasses set `kind`, `role` and `Params`."""

    kind: ClassVar[str] = ""
    role: ClassVar[str] = "plugin"  #: plugin | filter | fan
    Params: ClassVar[type[ParamsModel]] = ParamsModel
    #: The param a bare word on the command line sets (`memory 1G`, `ondemand dir=d 1G`).
    magic: ClassVar[str | None] = None
    #: Fewest upstreams a fan needs.
    min_members: ClassVar[int] = 0
    #: True for kinds whose data sits in this process's memory (memory): the session then sends
    #: reads straight from it (lend_read), without a copy through a buffer. Writes arrive in a
    #: buffer first, or in memory the write adopts when it runs (land_write): either way a
    #: write cut off mid-payload never lands half-way.
    lends_memory: ClassVar[bool] = False
    #: True for kinds whose pwrite never waits (its coroutine ends at its first step: memory).
    #: The session then hands it a WRITE payload still in the connection's read buffer, not a
    #: copy in a buffer of its own, since the write is done before that buffer is read into
    #: again (a write held by a pause gets its copy first).
    writes_inline: ClassVar[bool] = False
    #: True for kinds that can often read without waiting (file: from the page cache): the
    #: session first tries read_now as a plain call, and awaits pread only where it says no.
    #: (Not a ClassVar: a backend may find out when it opens its data that it cannot.)
    reads_inline: bool = False
    #: True for kinds that N processes can serve together (--workers): their state lives in the
    #: kernel (files), nowhere (null), upstream (nbd), or moves to shared memory in share().
    shareable: ClassVar[bool] = False
    #: The param naming a file where the node keeps what it must know after a restart (a
    #: mirror's member states and dirty maps). An orchestrator sets it when the user did not.
    state_param: ClassVar[str | None] = None
    #: The params that file depends on: when one changes (or the upstreams do), it is stale.
    state_keys: ClassVar[tuple[str, ...]] = ()
    #: A multi-export backend whose exports must be listed or opened by waiting (on an
    #: upstream): the handshake awaits prepare_export() before each exports()/for_export().
    prepares_exports: ClassVar[bool] = False
    #: Set on its backend by the node runtime that serves it: calling it shuts the node down as
    #: SIGTERM does (no new clients, requests in flight finish, flush, exit 0). For kinds that
    #: end their node (exitlast, exitwhen); None where no node serves the backend (a test's).
    stop_node: Callable[[], None] | None = None
    #: Set on its backend by the node runtime that serves it: the node was started with
    #: --read-only (the scriptable kinds tell their script, as nbdkit tells it of -r).
    read_only: bool = False
    #: Set on its backend by the node runtime that serves it, as stop_node: its pause and
    #: resume (the pause filter's control socket drives them). None where no node serves it.
    node: NodeControl | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Lending bypasses pread: a subclass that changes it lends only if it says so.
        if "lends_memory" not in cls.__dict__ and "pread" in cls.__dict__:
            cls.lends_memory = False
        if "writes_inline" not in cls.__dict__ and "pwrite" in cls.__dict__:
            cls.writes_inline = False
        if "reads_inline" not in cls.__dict__ and "pread" in cls.__dict__:
            cls.reads_inline = False

    def __init__(self, params: ParamsModel) -> None:
        self.params = params

    @classmethod
    def create(cls, params: ParamsModel) -> Backend:
        """The plugin `nbdfabric node KIND PARAMS` serves: an instance of this class, unless
        the kind has modes served by different classes (file: one file, or dir=)."""
        return cls(params)

    @classmethod
    def multi_export(cls, params: ParamsModel) -> MultiExport | None:
        """None for a node of these params that serves one export; for one that serves several,
        chosen by the client's export name, what they are ("directory": one per file, file
        dir=). Known from the params, before start (exports() agrees once started), so that
        the orchestrator can route an upstream to one of them (`NODE/EXPORT`) and give the node
        no --export-name."""
        return None

    # Lifecycle ----------------------------------------------------------------------------

    def share(self) -> None:
        """Before --workers forks (only for `shareable` kinds): put state where every process
        sees it. Most shareable kinds have none to move."""

    async def start(self) -> None:
        """Open what the backend needs; capabilities() is valid afterwards."""

    async def stop(self) -> None:
        """Release resources; called once at shutdown."""

    def capabilities(self) -> Capabilities:
        raise NotImplementedError

    def contexts(self) -> tuple[str, ...]:
        """Meta contexts it answers besides base:allocation (`qemu:allocation-depth`,
        `qemu:dirty-bitmap:NAME`), offered to clients by name; block status in one of them is
        context_extents(). None by default; a filter with `passes_contexts` offers its
        upstream's."""
        return ()

    async def context_extents(self, context: str, count: int, offset: int, flags: int) -> Extents:
        """Block status in meta context `context` (one of contexts()): (length, value) runs
        from `offset`, as extents() gives base:allocation's; REQ_ONE in `flags` wants one."""
        raise OSError(errno.EINVAL, f"no meta context {context}")

    def exports(self) -> list[tuple[str, str]] | None:
        """None for a backend that serves one export (all kinds but file dir=; asked once,
        after start). A backend that serves several, chosen by the client's export name,
        returns the (name, description) of each it serves now: NBD_OPT_LIST shows them, and
        for_export() gives the backend that serves one. Raising OSError refuses the list (the
        client gets NBD_REP_ERR_POLICY): exportname's exportname-list=error."""
        return None

    def for_export(self, name: str) -> Backend | None:
        """Of a multi-export backend (see exports()): the backend that serves export `name`,
        or None to refuse the name (the client gets NBD_REP_ERR_UNKNOWN). Runs during the
        handshake, which waits for it: no long waits. The session then uses that backend for
        capabilities(), export_size(), open/close_connection() and every request; the node's
        own backend keeps start/stop, flush at shutdown, status() and the control plane."""
        return self

    async def prepare_export(self, name: str | None) -> None:
        """Of a multi-export backend with `prepares_exports`: do now what the synchronous call
        that follows needs waited for, so that it answers at once: before for_export(name),
        open what serves `name` (exportname: a connection to the upstream export it maps to);
        before exports() (`name` None), fetch the list. The handshake awaits it, within
        --handshake-limit; a failure is remembered for the call that follows (for_export:
        None), never raised."""

    def for_client(self) -> Backend:
        """The backend that serves the client now negotiating (`current_client`: its address,
        whether it started TLS), whatever export it names: this one by default. Runs at the
        client's handshake, when it asks for an export; another backend returned serves that
        client alone, as for_export()'s do (tls-fallback: a notice for plaintext clients)."""
        return self

    def sockets(self) -> list[str]:
        """Unix sockets the backend listens on itself (the pause filter's control socket),
        made by start(): a node run with -u/-g gives them to its user with its own."""
        return []

    def export_identity(self, requested: str) -> tuple[str, str]:
        """Of a backend for_export() returned: the canonical name and the description a client
        that asked for `requested` is told (NBD_INFO_NAME, NBD_INFO_DESCRIPTION; "" for none:
        the node's --description)."""
        return requested, ""

    def export_size(self, export_name: str, size: int) -> int | None:
        """The size a client asking for `export_name` sees (`size`: capabilities().size), or
        None to refuse that export. Runs during the client's handshake, so `current_client`
        is set; only kinds whose content depends on the client (`info`) override it."""
        return size

    def configure(self, changes: dict[str, Any]) -> None:
        """Apply live param changes (already checked to be live). Override to react."""
        self.params = update_params(self.kind, self.params, changes)

    def status(self) -> dict[str, Any]:
        """Kind-specific state for `info` (upstream health, fan members, cache fill, ...)."""
        return {}

    def healthy(self) -> bool:
        """False when the node cannot serve (e.g. its upstream is down)."""
        return True

    async def preconnect(self) -> None:
        """A client connected, before any byte of the handshake (`current_client` says who).
        Raise OSError to refuse it: the connection is closed without a word (nbdkit's
        .preconnect), and the node serves on."""

    async def open_connection(self) -> None:
        """A client finished the handshake (`current_client` says who): before its first request."""

    async def close_connection(self) -> None:
        """A client's connection ended, after its last request (its `current_client` still set)."""

    async def connection_ended(self) -> None:
        """A client that preconnect() let in is gone, whether or not it finished the handshake
        (after close_connection() if it did). Of the node's own backend, as preconnect(): what
        preconnect() took for a client (noparallel's one-client-at-a-time turn) is given back
        here, where close_connection() would miss a client that never finished negotiating."""

    # Data operations ----------------------------------------------------------------------

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        raise unsupported("read")

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        raise OSError(errno.EPERM, "this export is read-only")

    async def flush(self, flags: int) -> None:
        raise unsupported("flush")

    async def trim(self, count: int, offset: int, flags: int) -> None:
        raise unsupported("trim")

    async def zero(self, count: int, offset: int, flags: int) -> None:
        raise unsupported("write zeroes")

    async def cache(self, count: int, offset: int, flags: int) -> None:
        raise unsupported("cache")

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        """Default: everything is allocated data (what the spec says is always safe)."""
        return [(count, 0)]

    def land_write(self, count: int, offset: int) -> Landing | None:
        """Where a WRITE of `count` bytes at `offset` may be received without a copy after it
        (only asked where writes_inline; a big WRITE whose payload is still to come). None:
        into a buffer, then pwrite."""
        return None

    def write_now(self, buf: memoryview, offset: int) -> None:
        """What pwrite without flags does, as a plain call (only asked where writes_inline:
        the session then writes without a coroutine)."""
        raise NotImplementedError

    def read_now(self, buf: memoryview, offset: int) -> bool:
        """Fill `buf` with the bytes at `offset` as pread without flags would (all data, no
        holes), as a plain call, if that needs no waiting (only asked where reads_inline).
        False, having left `buf` undefined, where it would wait: the session then awaits
        pread."""
        raise NotImplementedError

    # Lending (only where lends_memory) -------------------------------------------------------

    def lend_read(self, count: int, offset: int) -> list[Piece]:
        """The `count` bytes at `offset` as pieces, in order: views of the backend's own memory
        and hole lengths. The session sends them as they are, so a view may show a write that
        lands before it leaves: only a request in flight at the same time can do that, and the
        spec leaves overlapping requests in flight unordered. Views are never resized."""
        raise NotImplementedError


class Landing:
    """A WRITE payload received straight into memory the backend will keep (land_write): the
    socket fills `views` in order (made as the payload reaches them, if more() makes them),
    and commit() is the write. Until then the backend's data is untouched, so a write cut off
    mid-payload, refused, or held by a pause changes nothing; release() gives back what a
    landing that was never committed holds (after a commit it does nothing)."""

    views: list[memoryview]

    def more(self) -> bool:
        """Append the next views to `views` (the same list), for a landing that makes them as
        the payload reaches them; False when it has made them all (the default: all up front)."""
        return False

    def commit(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError


class Plugin(Backend):
    role = "plugin"


class ZeroContent(Plugin):
    """The read side of a disk whose content is all zeros (null, zero, full): reads are one hole
    (the server sends zeros or a hole chunk), cache has nothing to do, extents are one hole."""

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        return [(0, len(buf))]

    async def cache(self, count: int, offset: int, flags: int) -> None:
        pass

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        return all_zero_extent(count)


class Filter(Backend):
    """Passes every operation to `self.next` unless it overrides it."""

    role = "filter"
    #: True for filters that serve every byte at the upstream's offset and do not change what
    #: it holds but by passing writes on (delay, log, stats, ...): the meta contexts the
    #: upstream offers (a cow's dirty bitmap) then describe this export too, and are offered
    #: and answered through it. A filter that also acts on extents (delays, logs, retries
    #: them) does the same in context_extents(). Not for one that moves bytes (offset),
    #: changes them (swab, luks), or holds writes back (cache).
    passes_contexts: ClassVar[bool] = False

    def __init__(self, params: ParamsModel, next: Backend) -> None:
        super().__init__(params)
        self.next = next

    async def start(self) -> None:
        await self.next.start()

    async def stop(self) -> None:
        await self.next.stop()

    def capabilities(self) -> Capabilities:
        return self.next.capabilities()

    def status(self) -> dict[str, Any]:
        return self.next.status()

    def healthy(self) -> bool:
        return self.next.healthy()

    async def preconnect(self) -> None:
        await self.next.preconnect()

    async def open_connection(self) -> None:
        await self.next.open_connection()

    async def close_connection(self) -> None:
        await self.next.close_connection()

    async def connection_ended(self) -> None:
        await self.next.connection_ended()

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        return await self.next.pread(buf, offset, flags)

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        await self.next.pwrite(buf, offset, flags)

    async def flush(self, flags: int) -> None:
        await self.next.flush(flags)

    async def trim(self, count: int, offset: int, flags: int) -> None:
        await self.next.trim(count, offset, flags)

    async def zero(self, count: int, offset: int, flags: int) -> None:
        await self.next.zero(count, offset, flags)

    async def cache(self, count: int, offset: int, flags: int) -> None:
        await self.next.cache(count, offset, flags)

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        return await self.next.extents(count, offset, flags)

    def contexts(self) -> tuple[str, ...]:
        return self.next.contexts() if self.passes_contexts else ()

    async def context_extents(self, context: str, count: int, offset: int, flags: int) -> Extents:
        if not self.passes_contexts:
            return await super().context_extents(context, count, offset, flags)
        return await self.next.context_extents(context, count, offset, flags)


class Fan(Backend):
    """Combines several upstreams (`self.members`, in `--upstream` order)."""

    role = "fan"
    min_members = 2

    def __init__(self, params: ParamsModel, members: Sequence[Backend]) -> None:
        super().__init__(params)
        self.members = list(members)

    async def start(self) -> None:
        for member in self.members:
            await member.start()

    async def stop(self) -> None:
        for member in self.members:
            await member.stop()


# Helpers for kinds ---------------------------------------------------------------------------

# Plain ints: `int & IntFlag` runs Python code in enum.py, and these run per request.
_FUA, _NO_HOLE = int(CmdFlag.FUA), int(CmdFlag.NO_HOLE)


def add_range(ranges: list[tuple[int, int]], start: int, length: int) -> None:
    """Append (start, length) to sorted ranges, extending the last one when they touch."""
    if ranges and ranges[-1][0] + ranges[-1][1] == start:
        ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
    else:
        ranges.append((start, length))


#: Zeros to copy from: a slice of a view is free, where `bytes(n)` allocates n zeroed bytes.
_ZEROS = memoryview(bytes(64 * 1024))


def zero_range(view: memoryview) -> None:
    """Fill `view` with zeros, 64K at a time from one shared zero buffer (no allocation)."""
    step, n = len(_ZEROS), len(view)
    if n <= step:
        view[:] = _ZEROS[:n]
        return
    for pos in range(0, n, step):
        m = min(step, n - pos)
        view[pos : pos + m] = _ZEROS[:m]


def fill_holes(buf: memoryview, holes: Holes) -> None:
    """Zero the hole ranges of a read so the buffer holds the plain data."""
    for start, length in holes or ():
        zero_range(buf[start : start + length])


async def read_flat(backend: Backend, buf: memoryview, offset: int, flags: int = 0) -> None:
    """Read into `buf` with holes filled with zeros: what a filter that looks at data wants."""
    fill_holes(buf, await backend.pread(buf, offset, flags))


def all_zero_extent(count: int) -> Extents:
    return [(count, Extent.HOLE | Extent.ZERO)]


def fua_requested(flags: int) -> bool:
    return bool(flags & _FUA)


def may_trim(flags: int) -> bool:
    """WRITE_ZEROES may punch a hole unless the client said NO_HOLE."""
    return not flags & _NO_HOLE


def first_difference(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> int:
    """The index of the first byte where two equal-length buffers differ; len(a) if none."""
    if a == b:
        return len(a)
    lo, hi = 0, len(a)
    while hi - lo > 64:  # halve on memcmp-sized slices, then look byte by byte
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    return next(i for i in range(lo, hi) if a[i] != b[i])
