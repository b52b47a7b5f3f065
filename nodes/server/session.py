"""One client connection: the handshake through the sans-IO core, then the transmission phase.

The hot path: on a plain socket the event loop reads straight into the request framer's buffer
(a BufferedProtocol, the socket watched for the whole connection: no registration per read);
the framer cuts requests out of it (many small ones per read) and lets large WRITE payloads land
in pooled buffers, or, where the backend keeps its data in memory, in pages it adopts (a
Landing, filled by scatter reads). Requests run concurrently, eagerly and without Tasks
(eager.py), and reply out of order unless the node asks for ordered replies or fully serial
execution. Replies leave as one `sendmsg` of header + data views, on a duplicate of the socket.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import mmap
import select
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from ..base import Backend, Capabilities, ClientInfo, Landing, Piece, Support, current_client
from ..protocol import transmission as tx
from ..protocol.constants import (
    BASE_ALLOCATION_ID,
    REPLY_EXTENTS,
    Cmd,
    CmdFlag,
    Err,
)
from ..protocol.errors import ProtocolError, to_wire
from ..protocol.handshake import NEED_DATA, Closed, Prepare, Ready, ServerHandshake, StartTLS
from .eager import Resumed, start_eager
from .framing import Dispatch, RequestFramer, lent
from .pages import Pooled, PooledPages, lazy_buffer
from .poll import POLLER
from .relay import Relay, can_relay
from .replies import ZERO_CHUNK, ZERO_VIEW, pieces_of, read_reply
from .stream import Buffer, SocketStream, Stream, TLSStream, remainder

if TYPE_CHECKING:
    from .node import NodeRuntime

log = logging.getLogger("nbdfabric.session")

#: Requests in flight per connection before we stop reading more (backpressure).
MAX_IN_FLIGHT = 64
#: Data bytes (read replies, write payloads) in flight per connection before we stop reading
#: more. Replies leave one socket in turn, so preparing many big ones ahead only churns
#: memory; a few MiB keeps the socket busy.
MAX_BYTES_IN_FLIGHT = 8 * 1024 * 1024
#: Reply bytes gathered during one feed before they go out anyway.
MAX_CORK = 256 * 1024
#: Pooled buffers from this size on are made lazy (see BufferPool): at and above glibc's
#: mmap threshold a bytearray is a fresh mapping anyway, which its zero-fill then touches.
LAZY_FROM = 256 * 1024
#: Memory a reply's part holds beyond its bytes, counted against the byte budget while the
#: socket has not taken it: a header's bytes object, or a view of the backend's memory and its
#: buffer object, and its list slot (a 1-byte read's reply: 29 bytes, some 400 in objects).
_PART_COST = 256
#: Seconds of work the costly commands (block status, trim, zero, cache: a few bytes to ask
#: for gigabytes to walk) of one connection may do inline, in the feeds that read them, before
#: that connection stops reading for a turn of the event loop: the other clients' turn.
MAX_INLINE_WORK = 0.02
#: What a hold adds to the requests in flight: enough for _blocked(), so that neither the
#: feed (no test of its own per request) nor a request that finishes meanwhile reads on.
_HOLD = MAX_IN_FLIGHT

# Plain ints for the hot path: arithmetic on IntFlag members runs Python code in enum.py.
_READ, _WRITE, _DISC = int(Cmd.READ), int(Cmd.WRITE), int(Cmd.DISC)
_FLUSH, _TRIM, _CACHE = int(Cmd.FLUSH), int(Cmd.TRIM), int(Cmd.CACHE)
_ZERO, _STATUS = int(Cmd.WRITE_ZEROES), int(Cmd.BLOCK_STATUS)
_FUA, _DF, _FAST_ZERO = int(CmdFlag.FUA), int(CmdFlag.DF), int(CmdFlag.FAST_ZERO)
_REQ_ONE = int(CmdFlag.REQ_ONE)
_NO_LIMIT = 1 << 64  #: longer than any request (the length is 32 bits on the wire)

_OP_NAMES = {
    Cmd.READ: "read",
    Cmd.WRITE: "write",
    Cmd.FLUSH: "flush",
    Cmd.TRIM: "trim",
    Cmd.CACHE: "cache",
    Cmd.WRITE_ZEROES: "zero",
    Cmd.BLOCK_STATUS: "block_status",
}


class BufferPool:
    """Reusable buffers in power-of-two size classes: no allocation per request.

    A fresh buffer of LAZY_FROM bytes or more is a lazy mapping (pages.py): a WRITE's buffer
    costs memory as its payload arrives, not when its header does. As bytearrays, 32 headers
    of 32 MiB writes with no payload behind them held 1 GiB of a file node's memory (as
    nbdkit's, whose buffers are zeroed too)."""

    def __init__(self, max_pooled: int = 64 * 1024 * 1024) -> None:
        self._free: dict[int, list[Pooled]] = {}
        self._pooled = 0
        self._max = max_pooled

    def get(self, size: int) -> Pooled:
        cls = max(4096, 1 << (size - 1).bit_length())
        free = self._free.get(cls)
        if free:
            self._pooled -= cls
            return free.pop()
        if cls < LAZY_FROM:
            return bytearray(cls)
        return PooledPages(-1, cls, flags=mmap.MAP_PRIVATE)

    def put(self, buf: Pooled) -> None:
        if self._pooled + len(buf) <= self._max:
            self._free.setdefault(len(buf), []).append(buf)
            self._pooled += len(buf)


@dataclass(frozen=True)
class Export:
    """What a client chose in the handshake (the handle of its ExportInfo): the backend that
    serves that export and its capabilities as the client was told them."""

    backend: Backend
    caps: Capabilities


class Session:
    def __init__(self, node: NodeRuntime, stream: Stream, client: ClientInfo) -> None:
        self.node = node
        self.stream = stream
        self.client = client
        #: The export's backend and capabilities, from the handshake on: the node's own unless
        #: it serves several exports (file dir=). Every request uses these.
        self.backend = node.backend
        self.caps = node.caps
        self.handshake: ServerHandshake | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        #: Requests that had to wait, carried on without a Task (see eager.py).
        self.waiting: set[Resumed] = set()
        #: Its requests a pause holds (see NodeRuntime.wait_resumed).
        self.holds: set[asyncio.Future[bool]] = set()
        self._drainers: list[asyncio.Future[None]] = []  #: drain() calls waiting for them
        self.closed = False
        #: Replies the socket has not taken yet, in the order they are to leave (see _push).
        #: While it holds any, later replies queue behind them.
        self._outbox: deque[_Queued] = deque()
        self._sender: asyncio.Task[None] | None = None  #: empties the outbox
        #: Backpressure: reading stops at MAX_IN_FLIGHT requests or MAX_BYTES_IN_FLIGHT until
        #: a reply makes room (plain counters: this runs per request).
        self._busy = 0
        self._busy_bytes = 0
        self._serial = False
        self._reading_paused = False  #: reading stopped for backpressure
        self._held = False  #: reading stopped until the loop has run the others (see _hold)
        self._inline_work = 0.0  #: seconds of costly commands run inline since the last hold
        self._room = asyncio.Event()  #: set while reading may go on (the TLS reader waits on it)
        self._room.set()
        self._feeding = False
        self._transport: asyncio.Transport | None = None
        self._framer: RequestFramer | None = None
        self._done: asyncio.Future[None] | None = None
        self._last_reply: asyncio.Future[None] | None = None
        #: Replies of requests served inline while one read is fed, and the pooled buffers
        #: they show: they leave in one sendmsg when the feed ends.
        self._corked: list[Buffer] = []
        self._cork_buffers: list[Pooled] = []
        self._cork_bytes = 0
        self._cork_replies = False
        self._relay: Relay | None = None  #: relaying this connection (nbd relay=true)
        self._polled: int | None = None  #: the socket's fd, while POLLER watches it

    # Entry ---------------------------------------------------------------------------------

    async def run(self) -> None:
        current_client.set(self.client)
        admitted = opened = False
        try:
            if not await self._preconnect():
                return
            admitted = True
            ready = await self._handshake_in_time()
            if ready is not None:
                export = ready.export.handle
                assert isinstance(export, Export), "the node's lookup sets the handle"
                self.backend, self.caps = export.backend, export.caps
                opened = True
                await self.backend.open_connection()
                await self._transmission(ready)
        except ProtocolError as exc:
            self.node.stats.protocol_errors += 1
            log.info("%s: protocol error, disconnecting: %s", self.client.address, exc)
        except (ConnectionError, OSError) as exc:
            log.debug("%s: connection lost: %s", self.client.address, exc)
        finally:
            await self.drain()
            self.closed = True
            if self._framer is not None:
                self._framer.release()
            try:
                # Before the socket closes: a delayed close is seen by the client.
                await self._tell_backends_gone(opened, admitted)
            finally:
                if self._polled is not None:
                    POLLER.unwatch(self._polled)
                self.stream.close()
                if self._transport is not None:
                    self._transport.abort()
                # The framer refers back to this session (its validate and dispatch): in that
                # cycle the session and the framer's read buffer (256 KiB of address space,
                # as much RSS as reads reached) would wait for a full collection of the cyclic
                # GC, long after a long-lived session (an upstream's pooled connection) ended.
                # Nothing reads into it any more.
                self._framer = None

    async def _tell_backends_gone(self, opened: bool, admitted: bool) -> None:
        """close_connection() to the export's backend if the client opened it, then
        connection_ended() to the node's if preconnect() let the client in: each is called
        even if the other fails."""
        calls = [self.backend.close_connection] if opened else []
        if admitted:
            calls.append(self.node.backend.connection_ended)
        for call in calls:
            try:
                await call()
            except Exception as exc:
                log.warning("%s: closing the connection failed: %s", self.client.address, exc)

    async def drain(self) -> None:
        """Let requests in flight finish and their replies leave, including the rest of corked
        replies a full socket did not take (spec: on DISC the server finishes them first)."""
        try:
            while self.tasks or self.waiting:
                if self.waiting:
                    # One future per caller: cancelling one drain() leaves the others waiting.
                    idle = asyncio.get_running_loop().create_future()
                    self._drainers.append(idle)
                    await idle
                if self.tasks:
                    await asyncio.gather(*self.tasks, return_exceptions=True)
        except asyncio.CancelledError:
            for request in list(self.waiting):
                request.cancel()  # as gather() cancels the tasks it waits for
            raise

    def _request_done(self, request: Resumed) -> None:
        waiting = self.waiting
        waiting.discard(request)
        if not waiting and self._drainers:
            drainers, self._drainers = self._drainers, []
            for idle in drainers:
                if not idle.done():
                    idle.set_result(None)

    def drop_idle_pages(self) -> None:
        """Let the kernel have the read buffer's pages back if nothing waits in it."""
        if self._framer is not None:
            self._framer.drop_idle_pages()

    def begin_shutdown(self) -> None:
        if self.handshake is not None:
            self.handshake.shutting_down = True

    # Handshake -----------------------------------------------------------------------------

    async def _preconnect(self) -> bool:
        """Let the backend refuse the client before the handshake (nbdkit closes the connection
        without a word, and so do we); a unix-socket client's credentials go with it."""
        sock = getattr(self.stream, "sock", None)
        if isinstance(sock, socket.socket) and sock.family == socket.AF_UNIX:
            self.client.peer_credentials = _peer_credentials(sock)
        try:
            await self.node.backend.preconnect()
        except OSError as exc:
            log.info("%s: refused: %s", self.client.address, exc.strerror or exc)
            return False
        return True

    async def _handshake_in_time(self) -> Ready | None:
        """The handshake, within --handshake-limit: a client that connects and never finishes
        negotiating (slow, stuck, or holding connections open on purpose) must not keep a
        connection, and a --max-connections slot, forever (qemu-nbd's limit, default 10 s)."""
        limit = self.node.options.handshake_limit
        if not limit:
            return await self._handshake()
        try:
            async with asyncio.timeout(limit):
                return await self._handshake()
        except TimeoutError:
            self.node.stats.protocol_errors += 1
            log.info("%s: handshake not finished within %gs: disconnecting",
                     self.client.address, limit)  # fmt: skip
            return None

    async def _handshake(self) -> Ready | None:
        hs = self.handshake = ServerHandshake(self.node.handshake_policy())
        if self.node.draining:
            hs.shutting_down = True
        # Lazy: a client that connects and then says nothing holds this until --handshake-limit.
        view = memoryview(lazy_buffer(65536))
        while True:
            event = hs.next_event()
            out = hs.data_to_send()
            if out:  # the STARTTLS ACK too: it goes out in clear text
                await self.stream.send([out])
            if event is NEED_DATA:
                n = await self.stream.recv_into(view)
                if n == 0:
                    return None
                hs.receive_data(bytes(view[:n]))
            elif isinstance(event, StartTLS):
                await self._start_tls(hs, event.leftover)
            elif isinstance(event, Prepare):
                await self.node.prepare_export(event.name)
            elif isinstance(event, Ready):
                return event
            elif isinstance(event, Closed):
                if not event.soft:
                    log.info("%s: handshake ended: %s", self.client.address, event.reason)
                return None

    async def _start_tls(self, hs: ServerHandshake, leftover: bytes) -> None:
        context = self.node.tls_context
        assert context is not None and hasattr(self.stream, "sock")
        tls = TLSStream(self.stream, context, leftover)  # type: ignore[arg-type]
        try:
            await tls.handshake()
        except ssl.SSLError as exc:
            # As nbdkit logs it: an operator needs to see why a client was refused.
            log.warning("%s: TLS handshake failed: %s", self.client.address, exc)
            raise
        self.stream = tls
        self.client.tls = True
        hs.tls_started()

    # Transmission --------------------------------------------------------------------------

    async def _transmission(self, ready: Ready) -> None:
        node = self.node
        caps = self.caps
        #: Meta context id -> name, for block status in others than base:allocation.
        self.context_names = {i: n for n, i in ready.export.offered_contexts().items()}
        self.t = tx.Transmission(
            size=ready.export.size,
            tflags=ready.export.flags_for(ready.structured),
            structured=ready.structured,
            meta_contexts=ready.meta_contexts,
            # What the handshake advertised (node._info made it valid), not the backend's raw
            # figures: a client that keeps to the advertised sizes is never refused.
            block_min=ready.export.block_min,
            block_max=ready.export.block_max,
            enforce_block_size=caps.enforce_block_size,
        )
        #: A WRITE longer than this ends the connection before its payload is read.
        self._write_disconnect = caps.write_disconnect or _NO_LIMIT
        self._op_stats = {int(cmd): node.stats.ops[name] for cmd, name in _OP_NAMES.items()}
        self.client.export_name = ready.export.name
        self._ordering = node.options.ordering
        self._serial = self._ordering == "serial"
        # Corked replies would leave after later ones that skip the cork: not when ordered.
        self._cork_replies = self._ordering != "ordered"
        #: Reads are sent straight from the backend's memory where it lends it (memory).
        self._lends = self.backend.lends_memory
        #: Requests served at once as they are read (_read_now, _write_now), where the
        #: backend lends its memory or writes inline; not where replies must keep the
        #: requests' order (a request before them may still be waiting).
        self._serves_now: dict[int, Callable[[tx.Request, memoryview | Landing | None], bool]] = {}
        if self._ordering != "ordered":
            if self._lends:
                self._serves_now[_READ] = self._read_now
            elif self.backend.reads_inline:
                self._serves_now[_READ] = self._read_inline_now
            if self.backend.writes_inline:
                self._serves_now[_WRITE] = self._write_now
        self._loop = loop = asyncio.get_running_loop()
        # `nbd relay=true`: relayed to an upstream connection of its own where it can be.
        relay: Relay | None = None
        upstream = can_relay(self)
        if upstream is not None:
            relay = Relay(self, upstream)
            if not await relay.start():
                relay = None
        self._relay = relay
        done = self._done = loop.create_future()
        framer = self._framer = RequestFramer(
            self._validate_write_size if caps.write_disconnect else self._validate,
            # (A relay's framer never lands a payload: it is dispatched views only.)
            self._dispatch if relay is None else cast(Dispatch, relay.dispatch),
            node.pool,
            ready.leftover,
            lend_payloads=relay is not None or self.backend.writes_inline,
            # Big WRITE payloads straight into the backend's memory, where it keeps its data.
            land=self._land if relay is None and self.backend.writes_inline else None,
        )
        try:
            self._feed()  # requests that came in with the end of the handshake
            stream = self.stream
            if isinstance(stream, SocketStream) and not done.done():
                reader = _PollingSocketReader if POLLER.enabled else _SocketReader
                await loop.connect_accepted_socket(
                    lambda: reader(self, framer), stream.split_reader()
                )
            elif not isinstance(stream, SocketStream):
                await self._read_stream(framer)
            await done
        finally:
            if relay is not None:
                await relay.close()

    async def _read_stream(self, framer: RequestFramer) -> None:
        """The reader for streams the loop cannot read for us (TLS)."""
        assert self._done is not None
        stream = self.stream
        polling = POLLER.enabled and isinstance(stream, TLSStream)
        if polling:
            self._polled = cast(TLSStream, stream).raw.sock.fileno()
            POLLER.watch(self._polled)
        while not self._done.done():
            if self._reading_paused:
                await self._room.wait()
                continue
            n = await stream.recv_into(framer.get_buffer())
            if n == 0:
                self._finish()
                return
            if polling:
                POLLER.woke()
            framer.buffer_updated(n)
            self._feed()
            if polling and not cast(TLSStream, stream).buffered():
                POLLER.idle_soon(self._loop)  # nothing left to decrypt: the socket is next
            # A client that keeps the stream full would otherwise never let the loop run.
            await asyncio.sleep(0)

    def _feed(self) -> None:
        """Dispatch what the framer holds; pause reading when backpressure says so."""
        assert self._framer is not None and self._done is not None
        if self._feeding or self._done.done():
            return  # re-entered by a request that finished inline: the running feed goes on
        self._feeding = True
        try:
            more = self._framer.feed(self._blocked)
        except ProtocolError as exc:
            self._finish(exc)
            return
        finally:
            self._feeding = False
            if self._relay is not None:
                self._relay.flush_requests()
            if self._corked:
                self._flush_cork()
        if self._framer.disconnected:
            self._finish()
        elif more:  # MAX_FEED requests were dispatched: the others' turn
            self._hold()
        elif self._blocked():
            self._pause_reading()

    def _pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self._room.clear()
            if self._transport is not None:
                self._transport.pause_reading()

    def _hold(self) -> None:
        """Stop reading until the event loop has run once more (the other connections' events
        with it), then go on with what is buffered."""
        self._inline_work = 0.0
        if not self._held:
            self._held = True
            self._busy += _HOLD
            self._loop.call_soon(self._release)
        self._pause_reading()

    def _release(self) -> None:
        self._held = False
        self._busy -= _HOLD
        if self._reading_paused:
            self._made_room()

    def _charge(self, started: float) -> None:
        """A costly command is done: if it ran inline (the feed that read it is still going),
        the loop served no one else meanwhile. Hold reading once that adds up."""
        if self._feeding:
            self._inline_work += time.perf_counter() - started
            if self._inline_work >= MAX_INLINE_WORK:
                self._hold()

    def _blocked(self) -> bool:
        return (
            self._busy >= MAX_IN_FLIGHT
            or self._busy_bytes >= MAX_BYTES_IN_FLIGHT
            or (self._serial and self._busy > 0)
            or self.closed
        )

    def _made_room(self) -> None:
        """A request finished while reading was paused: go on if backpressure allows."""
        if self._blocked():
            return
        self._reading_paused = False
        self._feed()  # requests already buffered first (this may pause again)
        if not self._reading_paused:
            self._room.set()
            transport = self._transport
            if transport is not None and not transport.is_closing():
                transport.resume_reading()

    def _finish(self, exc: BaseException | None = None) -> None:
        """Reading is over: DISC, end of stream, a lost connection or a protocol error."""
        done = self._done
        if done is not None and not done.done():
            if exc is None:
                done.set_result(None)
            else:
                done.set_exception(exc)
        self._room.set()
        if self.holds and (exc is not None or self.closed or _hung_up(self.stream)):
            self._drop_holds()

    def _drop_holds(self) -> None:
        """The client is gone (or is being disconnected) while a pause holds some of its
        requests: they are dropped unserved, never reaching the backend, and the session ends
        now rather than at resume. (After DISC, or an end of stream that may be a half-close,
        they stay held: their replies are still owed.)"""
        for hold in list(self.holds):
            if not hold.done():
                hold.set_result(False)

    def _validate_write_size(self, req: tx.Request) -> Err:
        """_validate, on an export with a write-disconnect size (only there: this costs every
        request a test)."""
        if req.length > self._write_disconnect and req.cmd == _WRITE:
            # Before the payload: reading megabytes only to refuse them is what this avoids.
            raise ProtocolError(
                f"WRITE of {req.length} bytes is over the {self._write_disconnect} this "
                "export takes: disconnecting"
            )
        return self._validate(req)

    def _validate(self, req: tx.Request) -> Err:
        err = tx.validate(req, self.t)
        if err is Err.EINVAL and self._tolerated_tail(req):
            return Err.OK
        return err

    def _land(self, req: tx.Request) -> Landing | None:
        return self.backend.land_write(req.length, req.offset)

    def _dispatch(self, req: tx.Request, err: Err, payload: memoryview | Landing | None) -> None:
        """Start one request: run it now, and only if it has to wait, carried on by a driver."""
        if err is Err.OK:
            serve_now = self._serves_now.get(req.cmd)
            node = self.node
            if (
                serve_now is not None
                and not (node.paused or node.draining)
                and serve_now(req, payload)
            ):
                return
        self._busy += 1
        if req.cmd == _READ or req.cmd == _WRITE:
            self._busy_bytes += req.length
        if type(payload) is memoryview and self.node.paused and lent(payload):
            # Held until resume, long after the read buffer has moved on: a copy of its own.
            copy = self.node.pool.get(len(payload))
            copy[: len(payload)] = payload
            payload = memoryview(copy)[: len(payload)]
        previous = mine = None
        if self._ordering == "ordered":
            previous, mine = self._last_reply, self._loop.create_future()
            self._last_reply = mine
        request = start_eager(
            self._loop, self._serve(req, err, payload, previous, mine), self._request_done
        )
        if request is not None:
            self.waiting.add(request)

    # Served at once: most requests to a memory node. Nothing in them waits, so they need none
    # of what a request that may wait does (no coroutine, no turn, nothing in flight after
    # them). Each says False, having done nothing, to a request it leaves to _serve.

    def _read_now(self, req: tx.Request, payload: memoryview | Landing | None) -> bool:
        """A READ of memory the backend lends."""
        started = time.perf_counter()
        try:
            parts, failed = self._lent_reply(req), False
        except Exception as exc:
            parts, failed = self._failure_reply(req, exc), True
        self._send(parts)
        # As _record does, spelled out: one call fewer per request on the hot path.
        self._op_stats[_READ].record(
            0 if failed else req.length, time.perf_counter() - started, failed
        )
        return True

    def _read_inline_now(self, req: tx.Request, payload: memoryview | Landing | None) -> bool:
        """A READ the backend can do without waiting (read_now: a file's cached pages)."""
        if req.offset + req.length > self.t.size:
            return False  # an --eof-tolerant read past the end
        started = time.perf_counter()
        pool = self.node.pool
        buf: Pooled | None = pool.get(req.length) if req.length else None
        try:
            if buf is not None:
                view = memoryview(buf)[: req.length]
                if not self.backend.read_now(view, req.offset):
                    pool.put(buf)
                    return False
                pieces: list[Piece] = [view]
            else:
                pieces = []
            parts, failed = (
                read_reply(self.t, req, pieces, req.length, bool(req.flags & _DF)),
                False,
            )
        except Exception as exc:
            if buf is not None:
                pool.put(buf)
                buf = None
            parts, failed = self._failure_reply(req, exc), True
        self._send(parts, buf)  # buf goes back to the pool once the reply is out
        self._op_stats[_READ].record(
            0 if failed else req.length, time.perf_counter() - started, failed
        )
        return True

    def _write_now(self, req: tx.Request, payload: memoryview | Landing | None) -> bool:
        """A WRITE without FUA (which may need a flush) to a backend that writes inline."""
        if payload is None or req.flags & _FUA:
            return False
        started = time.perf_counter()
        try:
            if isinstance(payload, Landing):
                payload.commit()  # the payload is in the backend's memory already
            else:
                self.backend.write_now(payload, req.offset)
            parts, failed = [tx.simple_reply(req.cookie)], False
        except Exception as exc:
            parts, failed = self._failure_reply(req, exc), True
        finally:
            self._release_payload(payload)
        self._send(parts)
        self._op_stats[_WRITE].record(
            0 if failed else req.length, time.perf_counter() - started, failed
        )
        return True

    def _lent_reply(self, req: tx.Request) -> list[Buffer]:
        """The reply to a READ, showing the backend's own memory."""
        # Shorter than asked only for an --eof-tolerant read past the end.
        valid = min(req.length, self.t.size - req.offset)
        pieces = self.backend.lend_read(valid, req.offset) if valid else []
        return read_reply(self.t, req, pieces, valid, bool(req.flags & _DF))

    def _failure_reply(self, req: tx.Request, exc: Exception) -> list[Buffer]:
        """The error reply to a request whose backend call raised `exc`."""
        if isinstance(exc, OSError):
            wire = to_wire(
                exc.errno or errno.EIO,
                fast_zero=bool(req.flags & _FAST_ZERO),
                df=bool(req.flags & _DF),
            )
            return [self._error_reply(req, wire, exc.strerror or str(exc))]
        log.exception("%s: request %s failed", self.client.address, req, exc_info=exc)
        return [self._error_reply(req, Err.EIO, "internal error")]

    def _tolerated_tail(self, req: tx.Request) -> bool:
        """--eof-tolerant: a structured READ that starts inside the export but runs past its end
        gets the valid part and then an ERROR_OFFSET for the tail."""
        t = self.t
        if not (self.node.options.eof_tolerant and t.structured and req.cmd == _READ):
            return False
        if req.flags & ~_FUA or req.length > t.check_max:
            return False
        trial = tx.Request(req.flags, req.cmd, req.cookie, req.offset, t.size - req.offset)
        return req.offset < t.size < req.offset + req.length and tx.validate(trial, t) is Err.OK

    async def _serve(
        self,
        req: tx.Request,
        err: Err,
        payload: memoryview | Landing | None,
        previous: asyncio.Future[None] | None,
        mine: asyncio.Future[None] | None,
    ) -> None:
        """Run one request and send its reply (after `previous`'s, in ordered mode)."""
        node = self.node
        stats = node.stats
        stats.in_flight += 1
        started = time.perf_counter()
        parts: list[Buffer] | None = None
        read_buf: Pooled | None = None
        failed = err is not Err.OK
        try:
            if err is Err.OK and node.draining:
                err, failed = Err.ESHUTDOWN, True
            if err is not Err.OK:
                parts = [self._error_reply(req, err, _message(err))]
            elif node.paused and not await node.wait_resumed(self.holds):
                failed = True  # held by a pause, and its client went away meanwhile
            else:
                try:
                    if req.cmd != _READ:
                        parts = await self._execute(req, payload)
                    elif self._lends:
                        parts = self._lent_reply(req)
                    else:
                        # Shorter than asked only for an --eof-tolerant read past the end.
                        valid = min(req.length, self.t.size - req.offset)
                        pieces: list[Piece] = []
                        if valid:
                            read_buf = node.pool.get(valid)
                            view = memoryview(read_buf)[:valid]
                            holes = await self.backend.pread(view, req.offset, req.flags)
                            pieces = pieces_of(view, holes)
                        parts = read_reply(self.t, req, pieces, valid, bool(req.flags & _DF))
                except Exception as exc:
                    failed = True
                    parts = self._failure_reply(req, exc)
            if parts is not None:
                if previous is not None:
                    await previous
                held, read_buf = read_buf, None  # _send gives it back once the reply is out
                self._send(parts, held)
        finally:
            if mine is not None and not mine.done():
                mine.set_result(None)
            self._release_payload(payload)
            if read_buf is not None:
                node.pool.put(read_buf)
            stats.in_flight -= 1
            self._busy -= 1
            if req.cmd == _READ or req.cmd == _WRITE:
                self._busy_bytes -= req.length
            if self._reading_paused:
                self._made_room()
            self._record(req.cmd, req.length, started, failed)

    def _release_payload(self, payload: memoryview | Landing | None) -> None:
        """A served WRITE's payload is done with: a landing released (nothing, once
        committed), a pooled buffer given back (a view of the read buffer needs nothing)."""
        if isinstance(payload, Landing):
            payload.release()
        elif payload is not None and not lent(payload):
            self.node.pool.put(cast(Pooled, payload.obj))

    def _record(self, cmd: int, length: int, started: float, failed: bool) -> None:
        """A served request (command, length, perf_counter() when it began) in the node's
        per-operation statistics."""
        op = self._op_stats.get(cmd)
        if op is not None:
            nbytes = length if cmd in (_READ, _WRITE) and not failed else 0
            op.record(nbytes, time.perf_counter() - started, failed)

    def _send(
        self,
        parts: list[Buffer],
        held: Pooled | None = None,
        left: Callable[[], None] | None = None,
    ) -> bool:
        """Send one reply whole (not at all if the client is gone), then give `held` (the
        pooled buffer it shows) back. True when that is done at once (or the reply is
        corked); else the reply waits in the outbox, and `left()` is called once it is out
        (or the client is gone)."""
        if self._feeding and self._cork_replies:
            # Served inline while requests are being read: the reply leaves with the others
            # when the read is done. (Replies of requests that waited go at once: gathering
            # them for a turn of the loop measured slower at queue depth 1 and no faster at 16.)
            self._corked += parts
            if held is not None:
                self._cork_buffers.append(held)
            self._cork_bytes += sum(map(len, parts))
            if self._cork_bytes >= MAX_CORK:
                self._flush_cork()
            return True
        return self._push(parts, [held] if held is not None else [], left)

    def _push(
        self, parts: list[Buffer], held: list[Pooled], left: Callable[[], None] | None = None
    ) -> bool:
        """Send what the socket takes now, unless replies wait before this one; queue the rest
        (see _send)."""
        sent = 0
        if not self._outbox and not self.closed:
            # The common case: nothing waits and the socket takes the whole reply at once.
            try:
                sent = self.stream.try_send(parts)
            except OSError:
                self._lost()
        total = sum(map(len, parts))
        if self.closed or sent == total:
            for buf in held:
                self.node.pool.put(buf)
            return True
        rest = remainder(parts, sent) if sent else parts
        # What the socket has not taken counts against the byte budget until it leaves: the
        # requests are done and no longer do. Else a client that asks for big reads and never
        # reads a reply has the node queue replies without end, a MiB per 28 bytes. Each part
        # counts what holds it too: a tiny reply costs more in objects than in bytes.
        charge = total - sent + _PART_COST * len(rest)
        self._busy_bytes += charge
        self._outbox.append(_Queued(rest, total - sent, held, left, charge))
        if self._sender is None:
            self._sender = task = self._loop.create_task(self._send_queued())
            self.tasks.add(task)  # drain() waits for it
            task.add_done_callback(self.tasks.discard)
        return False

    async def _send_queued(self) -> None:
        """Empty the outbox: each time the socket has room, as many of the queued replies as
        it takes, in one system call."""
        outbox = self._outbox
        try:
            while outbox and not self.closed:
                parts = [part for queued in outbox for part in queued.parts]
                sent = await self.stream.send_some(parts)
                while sent and outbox:
                    queued = outbox[0]
                    if sent < queued.unsent:
                        queued.parts = remainder(queued.parts, sent)
                        queued.unsent -= sent
                        break
                    sent -= queued.unsent
                    self._sent(outbox.popleft())
                if self._reading_paused:
                    self._made_room()
        except OSError:
            self._lost()
        finally:
            self._sender = None
            while outbox:  # the client is gone: nothing more leaves
                self._sent(outbox.popleft())
            if self._reading_paused:
                self._made_room()

    def _sent(self, queued: _Queued) -> None:
        self._busy_bytes -= queued.charge
        for buf in queued.held:
            self.node.pool.put(buf)
        if queued.left is not None:
            queued.left()

    def _lost(self) -> None:
        # The client went away mid-reply: stop this session, leave the others alone.
        self.closed = True
        self._finish()

    def _flush_cork(self) -> None:
        """Send the corked replies in one go (the rest, if the socket is full, queued)."""
        parts, held = self._corked, self._cork_buffers
        self._corked, self._cork_buffers, self._cork_bytes = [], [], 0
        if parts:
            self._push(parts, held)

    def _error_reply(self, req: tx.Request, err: int, message: str) -> bytes:
        if self.t.structured:
            return tx.error_chunk(req.cookie, err, message)
        return tx.simple_reply(req.cookie, err)

    # Operations ----------------------------------------------------------------------------

    async def _execute(self, req: tx.Request, payload: memoryview | Landing | None) -> list[Buffer]:
        backend, caps = self.backend, self.caps
        cmd, flags, offset, length = req.cmd, req.flags, req.offset, req.length
        fua = bool(flags & _FUA)
        emulate_fua = fua and caps.fua is Support.EMULATE
        if emulate_fua:
            flags &= ~_FUA
        if cmd == _STATUS:
            started = time.perf_counter()
            count = min(length, self.t.size - offset)
            chunks = []
            for context in self.t.meta_contexts:  # one chunk each, the last one DONE
                name = self.context_names[context]
                if context != BASE_ALLOCATION_ID:
                    extents = await backend.context_extents(name, count, offset, flags)
                elif caps.extents:
                    extents = await backend.extents(count, offset, flags)
                else:
                    extents = [(count, 0)]
                clipped = tx.clip_extents(
                    extents,
                    count,
                    bool(flags & _REQ_ONE),
                    self.t.block_min,
                    REPLY_EXTENTS,
                    merge=tx.context_merge(name),
                )
                if not clipped:
                    raise OSError(errno.EIO, "the backend returned no extents")
                done = context == self.t.meta_contexts[-1]
                chunks.append(tx.block_status_chunk(req.cookie, context, clipped, done))
            self._charge(started)
            return chunks
        if cmd == _FLUSH:
            await backend.flush(flags)
        elif length == 0:
            pass  # zero-length write/trim/zero/cache: a no-op that succeeds
        elif cmd == _WRITE:
            assert payload is not None
            if isinstance(payload, Landing):
                payload.commit()  # the write: the payload is in the backend's memory already
                emulate_fua = emulate_fua or bool(flags & _FUA)  # as a pwrite with FUA would
            else:
                await backend.pwrite(payload, offset, flags)
        else:
            started = time.perf_counter()
            if cmd == _TRIM:
                await backend.trim(length, offset, flags)
            elif cmd == _ZERO:
                await self._zero(length, offset, flags)
            elif cmd == _CACHE:
                await self._cache(length, offset, flags)
            self._charge(started)
        if emulate_fua and length:
            await backend.flush(0)
        return [tx.simple_reply(req.cookie)]

    async def _zero(self, length: int, offset: int, flags: int) -> None:
        backend = self.backend
        if self.caps.zero is Support.NATIVE:
            try:
                await backend.zero(length, offset, flags)
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP) or flags & _FAST_ZERO:
                    raise
        if flags & _FAST_ZERO:
            raise OSError(errno.ENOTSUP, "zeroing is not faster than writing here")
        write_flags = flags & _FUA
        pos = 0
        while pos < length:
            n = min(ZERO_CHUNK, length - pos)
            await backend.pwrite(ZERO_VIEW[:n], offset + pos, write_flags)
            pos += n

    async def _cache(self, length: int, offset: int, flags: int) -> None:
        backend = self.backend
        if self.caps.cache is Support.NATIVE:
            await backend.cache(length, offset, flags)
            return
        # Read through a scratch buffer, which counts against the byte budget as a READ's
        # reply would: else each connection could hold MAX_IN_FLIGHT of them, 28 bytes each.
        scratch = self.node.pool.get(min(length, ZERO_CHUNK))
        self._busy_bytes += len(scratch)
        try:
            pos = 0
            while pos < length:
                n = min(len(scratch), length - pos)
                await backend.pread(memoryview(scratch)[:n], offset + pos, 0)
                pos += n
        finally:
            self._busy_bytes -= len(scratch)
            self.node.pool.put(scratch)


class _SocketReader(asyncio.BufferedProtocol):
    """Feeds a session from its socket: the loop reads straight into the framer's buffer."""

    def __init__(self, session: Session, framer: RequestFramer) -> None:
        self.session = session
        self.framer = framer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.session._transport = reading = cast(asyncio.Transport, transport)
        if self.session._reading_paused:
            reading.pause_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.framer.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        framer = self.framer
        framer.buffer_updated(nbytes)
        self.session._feed()
        # A payload landing in pages (begun by this feed: it came with its header; or one the
        # loop just read a page of) mostly waits in the socket: read it now, not a page at a
        # time on the loop's next turns, then dispatch it.
        if (views := framer.landing_views()) is not None and self._read_landing(views):
            self.session._feed()

    def _read_landing(self, views: list[memoryview] | None) -> bool:
        """The rest of a landing's payload (framer.landing_views(): `views` to begin with), as
        much as the socket holds, in scatter reads; whether any came. Read from the sending
        duplicate (the same socket); errors and the end of stream are left for the transport's
        next read."""
        sock = cast(SocketStream, self.session.stream).sock
        framer = self.framer
        got = False
        while views is not None:
            try:
                n = sock.recvmsg_into(views)[0]
            except OSError:  # BlockingIOError: all read for now
                break
            if not n:
                break
            framer.payload_received(n)
            got = True
            views = framer.landing_views()
        return got

    def eof_received(self) -> bool:
        self.session._finish()
        return True  # keep the socket: replies to requests in flight still go out

    def connection_lost(self, exc: Exception | None) -> None:
        self.session._finish()


class _PollingSocketReader(_SocketReader):
    """The same, telling the poller (--poll-max-us) when the loop wakes and when it may poll."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        session = self.session
        fd = cast(SocketStream, session.stream).sock.fileno()  # the reader's duplicate
        POLLER.watch(fd)
        session._polled = fd

    def buffer_updated(self, nbytes: int) -> None:
        POLLER.woke()
        super().buffer_updated(nbytes)
        POLLER.idle_soon(self.session._loop)


class _Queued:
    """A reply in the outbox: what is left of it to send, and what to do once it is out."""

    __slots__ = ("charge", "held", "left", "parts", "unsent")

    def __init__(
        self,
        parts: list[Buffer],
        unsent: int,
        held: list[Pooled],
        left: Callable[[], None] | None,
        charge: int,
    ) -> None:
        self.parts, self.unsent, self.held, self.left = parts, unsent, held, left
        self.charge = charge  #: what it counts against the byte budget


def _hung_up(stream: Stream) -> bool:
    """Whether the peer is gone for good: POLLHUP (a unix socket's peer closed it) or POLLERR
    (reset). A TCP peer's close looks like a half-close (FIN) until a reply is sent to it."""
    sock = getattr(stream, "sock", None) or getattr(getattr(stream, "raw", None), "sock", None)
    if not isinstance(sock, socket.socket):
        return False  # not known to be gone: its replies may still be owed
    if sock.fileno() < 0:
        return True
    poller = select.poll()
    poller.register(sock, 0)  # none asked for: hang-up and error come anyway
    ready = poller.poll(0)
    return bool(ready and ready[0][1] & (select.POLLHUP | select.POLLERR | select.POLLNVAL))


def _peer_credentials(sock: socket.socket) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of a unix socket's peer, where the kernel tells (SO_PEERCRED)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    try:
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, option, 12))
    except OSError:
        return None
    return pid, uid, gid


def _message(err: Err) -> str:
    return {
        Err.EINVAL: "invalid request (range, flags, alignment or command)",
        Err.ENOSPC: "request runs past the end of the export",
        Err.EPERM: "the export is read-only",
        Err.ESHUTDOWN: "the server is shutting down",
        Err.EOVERFLOW: "request too large to send unfragmented",
    }.get(err, err.name)
