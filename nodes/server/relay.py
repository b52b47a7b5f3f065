"""The relaying transmission phase of an `nbd relay=true` node: one upstream connection per
client, NBD messages passed between the two sockets whole, not re-issued through libnbd. The
`offset` and `partition` kinds (and `truncate` when it does not grow the upstream) relay the
same way to a window of their upstream: requests go
with their offsets moved by the window's start (`relay_shift`), and the offsets in replies
(data, hole and error chunks) come back moved, in place; a status chunk's last extent that
runs past the window's end (`relay_end`) is cut there.

After the client's handshake, `open_relay` connects one libnbd handle to the upstream with the
client's options (structured replies iff the client has them, the one meta context it chose),
checks that what the upstream offers covers what the client was told, then takes the socket
(`aio_get_fd`, duplicated) and never calls libnbd on that handle again: it is only dropped
(closed) at the end. Then:

- client -> upstream: the session's framer and validation as on the normal path; what the node
  must refuse itself (range, flags, read-only, block sizes, ESHUTDOWN while draining) is
  answered here as the normal path answers it; valid requests go upstream as bytes, cookie
  unchanged.
- upstream -> client: reply headers are parsed to cut the stream into whole messages (simple
  reply: a successful READ's data follows; structured: each chunk's length), and only whole
  messages are relayed, so a lost upstream still leaves every outstanding cookie a clean EIO
  (a simple error reply, or an ERROR chunk with DONE, valid after earlier chunks too). A
  BLOCK_STATUS chunk's context id is rewritten to the id the client got from us.
- each message is checked as libnbd checks what it receives (the re-issuing path's judge):
  its kind fits the command and what was negotiated, its length is one the command can have
  (checked from the header: a chunk that says 4 GiB follow is refused, not waited for), its
  offsets lie in the request, a READ's chunks cover its range and none overlaps another (a
  client that sums their lengths, as libnbd does, would take an overlap for the whole range
  and keep whatever its buffer held in the gap), a READ with DF gets one content chunk, and
  a BLOCK_STATUS one status chunk (one extent, no longer than asked, with REQ_ONE): stricter
  than libnbd 1.14, which checks none of these last ones. A message that fails is
  never relayed: the upstream is treated as lost (the requests outstanding get EIO, the
  client keeps its connection), where passing it on would have broken the client's.
- a lost upstream: everything outstanding and every new request gets EIO while it is down; the
  client keeps its connection; a new handle is connected with back-off (as nodes/upstream.py)
  and relaying goes on once it offers what the client was told.

Which connections relay (else the normal path serves them, decided once per connection):
a plain socket to the upstream (no nbds://: libnbd's TLS state cannot be taken over; a client
over TLS is fine, its requests are relayed once decrypted), at most one meta context selected
(libnbd 1.14 does not tell the upstream's context ids, so the one id of a reply must be that
context's), the default --ordering parallel, no --eof-tolerant (both change replies), and an
upstream that, connected for this client, has the size (or more) and every flag, meta context
and block size the client was told. An upstream that cannot be reached when the client
connects also leaves that client on the normal path. With --poll-max-us the poller watches
the relay's upstream socket too (a reply is what a relaying node waits for after it forwards
a request).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import nbd

from ..protocol import transmission as tx
from ..protocol.constants import (
    CHUNK_HEADER,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    U32,
    Chunk,
    Cmd,
    CmdFlag,
    Err,
    TFlag,
)
from ..upstream import BACKOFF_CAP, BACKOFF_FIRST
from . import session as _session
from .framing import lent
from .pages import Pooled, lazy_buffer
from .poll import POLLER
from .replies import read_reply
from .stream import Buffer, SocketStream, remainder

if TYPE_CHECKING:
    from ..upstream import Upstream
    from .session import Session

log = logging.getLogger("nbdfabric.relay")

#: The upstream reply buffer. A message longer than BIG gets a pooled buffer of its own, which
#: the socket fills directly (a 1 MiB read reply is not copied out of this one).
REPLY_BUFFER = 256 * 1024
BIG = 64 * 1024

_READ, _WRITE, _DISC, _FLUSH = int(Cmd.READ), int(Cmd.WRITE), int(Cmd.DISC), int(Cmd.FLUSH)
_STATUS = int(Cmd.BLOCK_STATUS)
_NONE, _DATA, _HOLE = int(Chunk.NONE), int(Chunk.OFFSET_DATA), int(Chunk.OFFSET_HOLE)
_STATUS_CHUNK, _ERROR_BIT, _DONE = int(Chunk.BLOCK_STATUS), 0x8000, 1
_ERROR_OFFSET = int(Chunk.ERROR_OFFSET)
_DF, _REQ_ONE = int(CmdFlag.DF), int(CmdFlag.REQ_ONE)
#: The longest status chunk taken from the upstream (libnbd's bound on any chunk), and the
#: longest error chunk: an errno, a message of at most 4096 bytes (the spec's cap on strings)
#: and an offset.
MAX_STATUS_CHUNK = (64 << 20) + 8
MAX_ERROR_CHUNK = 4 + 2 + 4096 + 8
_HOLE_BODY = struct.Struct(">QI")
_U64, _U32 = struct.Struct(">Q"), struct.Struct(">I")
_CHUNK_AT = struct.Struct(CHUNK_HEADER.format + "Q")  #: a chunk header and the u64 after it
_SIMPLE, _STRUCTURED = SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC
_SIMPLE_SIZE, _CHUNK_SIZE = SIMPLE_REPLY.size, CHUNK_HEADER.size
#: What the client may have been told, and how to ask a libnbd handle whether the upstream has it.
_OFFERS: tuple[tuple[TFlag, str], ...] = (
    (TFlag.SEND_FLUSH, "can_flush"),
    (TFlag.SEND_FUA, "can_fua"),
    (TFlag.SEND_TRIM, "can_trim"),
    (TFlag.SEND_WRITE_ZEROES, "can_zero"),
    (TFlag.SEND_FAST_ZERO, "can_fast_zero"),
    (TFlag.SEND_CACHE, "can_cache"),
)


@dataclass(slots=True)
class _Out:
    """A request the upstream has not finished answering."""

    cmd: int
    flags: int
    offset: int
    length: int
    started: float
    failed: bool = False
    #: a READ's bytes covered by its data and hole chunks so far; a BLOCK_STATUS's status chunks
    covered: int = 0
    #: a READ's covered bytes as spans (tx.cover), once a chunk came out of order; until then
    #: they are offset..offset+covered
    spans: list[tuple[int, int]] | None = None


class UpstreamFault(ValueError):
    """The upstream broke the protocol in the message at `at` of the bytes being cut: what
    came before it is relayed, it and what follows is not."""

    def __init__(self, why: str, at: int) -> None:
        super().__init__(why)
        self.at = at


def can_relay(session: Session) -> Upstream | None:
    """The upstream to relay this connection to, if it may relay at all (see the module's
    docstring); None: the normal path."""
    upstream = getattr(session.backend, "relay_upstream", None)
    options = session.node.options
    if (
        upstream is None
        or upstream.uri.startswith("nbds")
        or len(session.t.meta_contexts) > 1
        or options.ordering != "parallel"
        or options.eof_tolerant
    ):
        return None
    return cast("Upstream", upstream)


class Relay:
    def __init__(self, session: Session, upstream: Upstream) -> None:
        self.s = session
        self.up = upstream
        t = session.t
        #: The meta context the client chose (at most one) and the id we gave it.
        self.context = session.context_names[t.meta_contexts[0]] if t.meta_contexts else None
        self._context_id = U32.pack(t.meta_contexts[0]) if t.meta_contexts else b""
        self._structured = t.structured  #: the upstream connection's too (_mismatch checks)
        #: A window of the upstream (the offset, partition and truncate kinds): where the
        #: export starts in the upstream, and where it ends. Requests are sent moved by the
        #: shift, and the offsets in replies moved back; requests are checked against _Out in
        #: the upstream's.
        self._shift: int = getattr(session.backend, "relay_shift", 0)
        self._end: int | None = getattr(session.backend, "relay_end", None)
        self._out: dict[int, _Out] = {}
        self._idle: asyncio.Future[None] | None = None  #: set when _out empties (close waits)
        self._h: Any = None  #: the libnbd handle, kept only to be dropped (closed) at the end
        self._reader: asyncio.Transport | None = None
        self._polled: int | None = None  #: the upstream socket's fd, while POLLER watches it
        self._writer: SocketStream | None = None
        #: Requests to the upstream the socket has not taken yet, each with the pooled buffers
        #: its parts show (given back once sent).
        self._backlog: list[tuple[list[Buffer], list[Pooled]]] = []
        #: Requests forwarded during the session's current feed: they leave together, in one
        #: send, when the feed ends (flush_requests): at queue depth 16 that is one system
        #: call upstream for the sixteen requests a read of the client's socket brought.
        self._corked: list[Buffer] = []
        self._corked_held: list[Pooled] = []
        self._pushing: asyncio.Task[None] | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        #: Requests a pause holds (in order), each with its hold (NodeRuntime.hold).
        self._held: list[tuple[tx.Request, memoryview | None, asyncio.Future[bool]]] = []
        self._resuming: asyncio.Task[Any] | None = None  #: serves them after resume
        self.up_state: str = "down"
        self.closing = False

    # Connecting ---------------------------------------------------------------------------

    def _connect_blocking(self) -> Any:
        """A handle negotiated as the client negotiated with us (runs in a worker thread)."""
        h = nbd.NBD()
        h.set_request_structured_replies(self.s.t.structured)
        if self.context is not None:
            h.add_meta_context(self.context)
        h.connect_uri(self.up.uri)
        return h

    def _mismatch(self, h: Any) -> str:
        """What the upstream, as connected by `h`, lacks of what the client was told ("" if
        nothing): relaying to it would have the upstream refuse what the client may send."""
        t = self.s.t
        if h.get_size() < t.size + self._shift:  # bigger is fine: requests are checked
            return f"size {h.get_size()}, the client was told {t.size} from {self._shift}"
        if bool(h.get_structured_replies_negotiated()) != t.structured:
            return "structured replies differ"
        if not t.tflags & TFlag.READ_ONLY and h.is_read_only():
            return "read-only"
        for flag, ask in _OFFERS:
            if t.tflags & flag and not getattr(h, ask)():
                return f"no {ask}"
        if t.structured and t.tflags & TFlag.SEND_DF and not h.can_df():
            return "no can_df"
        if self.context is not None and not h.can_meta_context(self.context):
            return f"no meta context {self.context}"
        up_min = h.get_block_size(nbd.SIZE_MINIMUM) or 1
        up_max = h.get_block_size(nbd.SIZE_MAXIMUM) or t.check_max
        if t.check_min % up_min or t.check_max > up_max:
            return "block sizes differ"
        return ""

    @property
    def in_flight(self) -> int:
        """Requests sent upstream and not yet answered whole."""
        return len(self._out)

    async def _open(self) -> Any:
        return await self.up.connect_in_thread(self._connect_blocking)

    async def start(self) -> bool:
        """Connect and take the socket; False if this connection cannot relay (normal path)."""
        try:
            h = await self._open()
        except OSError as exc:
            log.info("%s: not relayed: %s", self.s.client.address, exc.strerror or exc)
            return False
        why = self._mismatch(h)
        if why:
            log.info("%s: not relayed: the upstream: %s", self.s.client.address, why)
            return False
        await self._attach(h)
        self.up.relays.add(self)
        log.info("%s: relayed to %s", self.s.client.address, self.up.uri)
        return True

    async def _attach(self, h: Any) -> None:
        """Take the connected handle's socket: from now on only raw NBD on a duplicate."""
        sock = socket.socket(fileno=os.dup(h.aio_get_fd()))
        self._h = h
        writer = SocketStream(sock)
        reading = writer.split_reader()
        self._writer = writer
        self.up_state = "up"
        loop = asyncio.get_running_loop()
        reader = _ReplyReader
        if POLLER.enabled:  # --poll-max-us: a reply due from upstream is worth polling for
            self._polled = reading.fileno()
            POLLER.watch(self._polled)
            reader = _PollingReplyReader
        await loop.connect_accepted_socket(lambda: reader(self), reading)

    # Client -> upstream -------------------------------------------------------------------

    def dispatch(self, req: tx.Request, err: Err, payload: memoryview | None) -> None:
        """The framer's callback for each request: answer it here or send it upstream."""
        s = self.s
        node = s.node
        if err is Err.OK and node.draining:
            err = Err.ESHUTDOWN
        if err is Err.OK and node.paused:
            self._hold(req, payload)
            return
        if err is Err.OK and req.cookie in self._out:
            err = Err.EINVAL  # a cookie still in flight: its replies could not be told apart
        if err is not Err.OK or self.up_state != "up":
            self._local(req, err if err is not Err.OK else Err.EIO, payload)
        elif req.length == 0 and req.cmd != _FLUSH:
            self._local(req, Err.OK, payload)  # a no-op, as the normal path answers it
        else:
            self._forward(req, payload)

    def _forward(self, req: tx.Request, payload: memoryview | None) -> None:
        s = self.s
        s.node.stats.in_flight += 1
        s._busy += 1
        if req.cmd == _READ or req.cmd == _WRITE:
            s._busy_bytes += req.length
        offset = req.offset
        # (FLUSH and DISC have no offset: their 0 is checked upstream)
        if self._shift and req.cmd != _FLUSH and req.cmd != _DISC:
            offset += self._shift
        self._out[req.cookie] = _Out(req.cmd, req.flags, offset, req.length, time.perf_counter())
        head = REQUEST.pack(REQUEST_MAGIC, req.flags, req.cmd, req.cookie, offset, req.length)
        if self.s._feeding:  # sent together when the feed ends (flush_requests)
            self._corked.append(head)
            if payload is not None:
                self._corked.append(payload)
                if not lent(payload):
                    self._corked_held.append(cast(Pooled, payload.obj))
        elif payload is None:
            self._to_upstream([head], [])
        else:
            self._to_upstream([head, payload], [] if lent(payload) else [cast(Pooled, payload.obj)])

    def flush_requests(self) -> None:
        """Send the requests forwarded during the feed that just ended (the session calls
        this at the end of each feed)."""
        if self._corked:
            parts, held = self._corked, self._corked_held
            self._corked, self._corked_held = [], []
            self._to_upstream(parts, held)

    def _local(self, req: tx.Request, err: Err, payload: memoryview | None) -> None:
        """Answer a request here, as the normal path answers one it refuses (or a zero-length
        one, which it answers without asking the upstream)."""
        s = self.s
        if payload is not None and not lent(payload):
            s.node.pool.put(cast(Pooled, payload.obj))
        if err is Err.OK:
            reply = (
                read_reply(s.t, req, [], 0, False)
                if req.cmd == _READ
                else [tx.simple_reply(req.cookie)]
            )
        else:
            reply = [s._error_reply(req, err, _session._message(err))]
        s._send(reply)
        op = s._op_stats.get(req.cmd)
        if op is not None:
            op.record(0, 0.0, err is not Err.OK)

    def _hold(self, req: tx.Request, payload: memoryview | None) -> None:
        """The node is paused: keep the request (reading stops) until resume. Counted as the
        normal path counts a held request (in flight, and one hold each), which pause() relies
        on: it waits until all that is in flight is held."""
        s = self.s
        if payload is not None and lent(payload):  # held past this feed: a copy of its own
            copy = s.node.pool.get(len(payload))
            copy[: len(payload)] = payload
            payload = memoryview(copy)[: len(payload)]
        s.node.stats.in_flight += 1
        self._held.append((req, payload, s.node.hold(s.holds)))
        if len(self._held) == 1:
            s._busy += _session._HOLD
            s._pause_reading()
            self._resuming = self._track(self._wait_resume())

    async def _wait_resume(self) -> None:
        s = self.s
        node = s.node
        try:
            while self._held:
                await asyncio.wait([self._held[0][2]])
                # Resume (or the session, for a client gone) settles every hold it finds at
                # once: the settled ones are a prefix, in the order the requests came.
                n = 0
                while n < len(self._held) and self._held[n][2].done():
                    n += 1
                settled, self._held = self._held[:n], self._held[n:]
                for req, payload, hold in settled:
                    node.unhold(hold, s.holds)
                    node.stats.in_flight -= 1
                    if not hold.result():  # the client is gone: dropped unserved
                        if payload is not None:
                            node.pool.put(cast(Pooled, payload.obj))
                    elif self.up_state == "up":
                        self._forward(req, payload)
                    else:
                        self._local(req, Err.EIO, payload)
        finally:
            s._busy -= _session._HOLD
        if s._reading_paused:
            s._made_room()

    def _to_upstream(self, parts: list[Buffer], held: list[Pooled]) -> None:
        """Send requests' bytes upstream after those queued before them, then give `held`
        back to the pool. What waits for room is copied out of the framer's read buffer
        first (payloads it lent are valid only until its feed ends)."""
        writer = self._writer
        pool = self.s.node.pool
        if writer is None:
            for buf in held:
                pool.put(buf)
            return
        if not self._backlog:
            try:
                sent = writer.try_send(parts)
            except OSError as exc:
                self._lost(f"sending: {exc}")
                for buf in held:
                    pool.put(buf)
                return
            if sent == sum(map(len, parts)):
                for buf in held:
                    pool.put(buf)
                return
            parts = remainder(parts, sent)
        self._backlog.append(([bytes(p) if _borrowed(p) else p for p in parts], held))
        if self._pushing is None:
            self._pushing = asyncio.get_running_loop().create_task(self._push())

    async def _push(self) -> None:
        """Send the backlog as the upstream socket takes it."""
        try:
            while self._backlog and self._writer is not None:
                parts, held = self._backlog[0]
                try:
                    await self._writer.send(parts)
                except OSError as exc:
                    self._lost(f"sending: {exc}")
                    return
                self._backlog.pop(0)
                for buf in held:
                    self.s.node.pool.put(buf)
        finally:
            self._pushing = None

    # Upstream -> client -------------------------------------------------------------------

    def cut(self, buf: memoryview, start: int, end: int) -> tuple[int, int]:
        """Retire the whole messages in buf[start:end]: (where the first incomplete one
        starts, its full size, or 0 if not even its header is there). Raises UpstreamFault
        at the first message that breaks the protocol."""
        out, structured = self._out, self._structured
        while True:
            avail = end - start
            if avail < 4:
                return start, 0
            magic = int.from_bytes(buf[start : start + 4], "big")
            if magic == _SIMPLE:
                if avail < _SIMPLE_SIZE:
                    return start, 0
                _, error, cookie = SIMPLE_REPLY.unpack_from(buf, start)
                o = out.get(cookie)
                if o is None:
                    raise UpstreamFault(f"a reply to unknown cookie {cookie:#x}", start)
                # where structured replies were negotiated, a READ must be answered in chunks
                # (even an error: libnbd refuses it), a BLOCK_STATUS that succeeds too
                if structured and (o.cmd == _READ or (o.cmd == _STATUS and not error)):
                    raise UpstreamFault(f"a simple reply to command {o.cmd} where structured "
                                        f"replies were negotiated", start)  # fmt: skip
                size = _SIMPLE_SIZE + (o.length if o.cmd == _READ and not error else 0)
                if avail < size:
                    return start, size
                o.failed = bool(error)
                self._retire(cookie, o)
            elif magic == _STRUCTURED:
                if avail >= _CHUNK_SIZE + 8:  # the header and what a data chunk's offset is
                    _, flags, kind, cookie, length, at = _CHUNK_AT.unpack_from(buf, start)
                elif avail >= _CHUNK_SIZE:
                    _, flags, kind, cookie, length = CHUNK_HEADER.unpack_from(buf, start)
                else:
                    return start, 0
                o = out.get(cookie)
                if o is None:
                    raise UpstreamFault(f"a chunk for unknown cookie {cookie:#x}", start)
                if not (
                    kind == _DATA
                    and o.cmd == _READ
                    and 8 < length <= o.length + 8
                    and structured
                    and not o.flags & _DF
                ):
                    why = self._chunk_fault(o, flags, kind, length)  # not the common case
                    if why:
                        raise UpstreamFault(f"{why} (cookie {cookie:#x})", start)
                size = _CHUNK_SIZE + length
                if avail < size:
                    return start, size
                body = start + _CHUNK_SIZE
                if kind == _DATA:  # (size > 28: `at` was unpacked)
                    length -= 8
                    if not o.offset <= at <= o.offset + o.length - length:
                        raise UpstreamFault(self._outside("data", at, length, o, cookie), start)
                    if at != o.offset + o.covered or o.spans is not None:  # out of order
                        self._cover(o, at, length, cookie, start)
                    o.covered += length
                    if self._shift:
                        _U64.pack_into(buf, body, at - self._shift)
                elif kind == _HOLE:
                    at, length = _HOLE_BODY.unpack_from(buf, body)
                    if not length or not o.offset <= at <= o.offset + o.length - length:
                        raise UpstreamFault(self._outside("hole", at, length, o, cookie), start)
                    if o.flags & _DF and length != o.length:
                        why = f"a hole chunk of {length} bytes for a READ of {o.length} with DF"
                        raise UpstreamFault(f"{why} (cookie {cookie:#x})", start)
                    if at != o.offset + o.covered or o.spans is not None:
                        self._cover(o, at, length, cookie, start)
                    o.covered += length
                    if self._shift:
                        _U64.pack_into(buf, body, at - self._shift)
                elif kind & _ERROR_BIT:
                    why = _error_fault(buf[body : body + length], kind, o)
                    if why:
                        raise UpstreamFault(f"{why} (cookie {cookie:#x})", start)
                    o.failed = True
                    if self._shift and kind == _ERROR_OFFSET:
                        end = body + length - 8
                        _U64.pack_into(buf, end, _U64.unpack_from(buf, end)[0] - self._shift)
                elif kind == _STATUS_CHUNK:
                    o.covered += 1  # (counts status chunks)
                    if (
                        o.flags & _REQ_ONE
                        and int.from_bytes(buf[body + 4 : body + 8], "big") > o.length
                    ):
                        why = f"an extent longer than the BLOCK_STATUS of {o.length} with REQ_ONE"
                        raise UpstreamFault(f"{why} (cookie {cookie:#x})", start)
                    if self._context_id:
                        buf[body : body + 4] = self._context_id
                    if self._end is not None and not _clip_status(
                        buf[body + 4 : body + length], self._end - o.offset
                    ):
                        why = "extents past the request before the last one"
                        raise UpstreamFault(f"{why} (cookie {cookie:#x})", start)
                if flags & _DONE:
                    if not o.failed and o.cmd == _READ and o.covered != o.length:
                        raise UpstreamFault(f"the chunks of a READ of {o.length} bytes covered "
                                            f"{o.covered} (cookie {cookie:#x})", start)  # fmt: skip
                    if not o.failed and o.cmd == _STATUS and not o.covered:
                        raise UpstreamFault(f"a BLOCK_STATUS reply without a status chunk "
                                            f"(cookie {cookie:#x})", start)  # fmt: skip
                    self._retire(cookie, o)
            else:
                raise UpstreamFault(f"bad reply magic {magic:#x}", start)
            start += size

    def _chunk_fault(self, o: _Out, flags: int, kind: int, length: int) -> str | None:
        """What is wrong with a chunk's header for its request, if anything (all that can be
        told before its payload is there)."""
        if not self._structured:
            return "a structured reply chunk, where structured replies were not negotiated"
        if kind == _DATA:
            if o.cmd != _READ:
                return f"a data chunk for command {o.cmd}"
            if o.flags & _DF and length - 8 == o.length:
                return None  # the one content chunk a READ with DF may have
            df = " with DF" if o.flags & _DF else ""
            return f"a data chunk of {length - 8} bytes for a READ of {o.length}{df}"
        if kind == _HOLE:
            if o.cmd != _READ or length != 12:
                return f"a hole chunk of {length} bytes for command {o.cmd}"
        elif kind == _NONE:
            if length or not flags & _DONE:
                return "a NONE chunk that is not the last, or not empty"
        elif kind == _STATUS_CHUNK:
            if o.cmd != _STATUS or not 12 <= length <= MAX_STATUS_CHUNK or (length - 4) % 8:
                return f"a status chunk of {length} bytes for command {o.cmd}"
            if o.covered:  # one context was negotiated: it gets one chunk
                return "a second status chunk for the one meta context"
            if o.flags & _REQ_ONE and length != 12:
                return f"{(length - 4) // 8} extents for a BLOCK_STATUS with REQ_ONE"
        elif kind & _ERROR_BIT:
            if not 6 <= length <= MAX_ERROR_CHUNK:
                return f"an error chunk of {length} bytes"
        else:
            return f"a chunk of unknown type {kind}"
        return None

    @staticmethod
    def _cover(o: _Out, at: int, length: int, cookie: int, start: int) -> None:
        """Count a READ's content chunk that does not simply extend what came before it; an
        overlap with what did is a fault (tx.cover)."""
        if o.spans is None:
            o.spans = [(o.offset, o.offset + o.covered)] if o.covered else []
        if not tx.cover(o.spans, at, at + length):
            raise UpstreamFault(f"a chunk of {length} bytes at {at} overlapping another of the "
                                f"READ's (cookie {cookie:#x})", start)  # fmt: skip

    @staticmethod
    def _outside(what: str, at: int, length: int, o: _Out, cookie: int) -> str:
        return (f"a {what} chunk of {length} bytes at {at}, outside the request's "
                f"{o.length} bytes at {o.offset} (cookie {cookie:#x})")  # fmt: skip

    def _retire(self, cookie: int, o: _Out) -> None:
        """A request's reply is complete (in the bytes being relayed): count it done."""
        del self._out[cookie]
        s = self.s
        s.node.stats.in_flight -= 1
        s._busy -= 1
        if o.cmd == _READ or o.cmd == _WRITE:
            s._busy_bytes -= o.length
        s._record(o.cmd, o.length, o.started, o.failed)
        if not self._out and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    def room_made(self) -> None:
        if self.s._reading_paused:
            self.s._made_room()

    def to_client(self, parts: list[Buffer], held: Pooled | None, resume: Callable[[], None]
                  ) -> bool:  # fmt: skip
        """Relay whole messages; False if the client socket is full (the caller stops reading
        the upstream until `resume` is called: its buffer must not be reused meanwhile)."""
        return self.s._send(parts, held, resume)

    def _track(self, coro: Any) -> asyncio.Task[Any]:
        """A task the session's drain() waits for."""
        task = asyncio.get_running_loop().create_task(coro)
        self.s.tasks.add(task)
        task.add_done_callback(self.s.tasks.discard)
        return task

    # Upstream lost ------------------------------------------------------------------------

    def _lost(self, why: str) -> None:
        """The upstream is gone: EIO for everything outstanding, then reconnect (unless the
        client is gone or leaving)."""
        if self.up_state != "up":
            return
        self.up_state = "down"
        if not self.closing:
            log.warning("%s: upstream %s lost: %s", self.s.client.address, self.up.uri, why)
        self._drop_connection()
        self.fail_outstanding(send=not self.s.closed)
        if not self.closing and not self.s.closed:
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    def _drop_connection(self) -> None:
        if self._polled is not None:
            POLLER.unwatch(self._polled)  # before its socket closes
            self._polled = None
        if self._reader is not None:
            self._reader.abort()
            self._reader = None
        if self._writer is not None:
            self._writer.sock.close()
            self._writer = None
        backlog, self._backlog = self._backlog, []
        held = [buf for _, bufs in backlog for buf in bufs] + self._corked_held
        self._corked, self._corked_held = [], []
        for buf in held:
            self.s.node.pool.put(buf)
        self._h = None  # dropping the last reference closes the handle (and its socket)

    def fail_outstanding(self, send: bool) -> None:
        s = self.s
        for cookie, o in list(self._out.items()):
            o.failed = True
            self._retire(cookie, o)
            if send:
                req = tx.Request(0, o.cmd, cookie, 0, o.length)
                s._send([s._error_reply(req, Err.EIO, f"upstream {self.up.uri} lost")])
        self.room_made()

    async def _reconnect(self) -> None:
        delay = BACKOFF_FIRST
        while not self.closing and not self.s.closed:
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_CAP)
            try:
                h = await self._open()
            except OSError:
                continue
            why = self._mismatch(h)
            if why:
                log.warning("%s: upstream came back with less (%s): not taken back",
                            self.s.client.address, why)  # fmt: skip
                continue
            if self.closing or self.s.closed:
                return
            await self._attach(h)
            log.warning("%s: upstream %s is back", self.s.client.address, self.up.uri)
            return

    # End ----------------------------------------------------------------------------------

    async def close(self) -> None:
        """The client is done: let outstanding replies come (unless the client is gone),
        then say DISC to the upstream and close it."""
        self.closing = True
        try:
            # Held by a pause: served after resume, as the normal path serves them after DISC
            # (or dropped, if the client is gone: the session settles their holds False).
            if self._resuming is not None and not self._resuming.done():
                await asyncio.wait([self._resuming])
            if self._out and not self.s.closed and self.up_state == "up":
                self._idle = asyncio.get_running_loop().create_future()
                await self._idle
        finally:
            if self._reconnecting is not None:
                self._reconnecting.cancel()
            if self.up_state == "up" and self._writer is not None and not self._backlog:
                disc = REQUEST.pack(REQUEST_MAGIC, 0, _DISC, 0, 0, 0)
                with contextlib.suppress(OSError):
                    self._writer.try_send([disc])
            self.up_state = "closed"
            self.up.relays.discard(self)
            self._drop_connection()
            self.fail_outstanding(send=False)
            if self._resuming is not None:
                self._resuming.cancel()  # only if close() itself was cancelled meanwhile
            node = self.s.node
            for _, payload, hold in self._held:
                node.unhold(hold, self.s.holds)
                node.stats.in_flight -= 1
                if payload is not None:
                    node.pool.put(cast(Pooled, payload.obj))
            self._held = []


def _error_fault(body: memoryview, kind: int, o: _Out) -> str | None:
    """What is wrong with an error chunk's payload (an errno that is not 0, the message's
    length, and for ERROR_OFFSET an offset inside the request), if anything."""
    if not int.from_bytes(body[:4], "big"):
        return "an error chunk with error 0"
    message = int.from_bytes(body[4:6], "big")
    if 6 + message > len(body):
        return f"an error message of {message} bytes in a chunk of {len(body)}"
    if kind == _ERROR_OFFSET:
        if len(body) != 6 + message + 8:
            return f"an ERROR_OFFSET chunk of {len(body)} bytes"
        at = int.from_bytes(body[6 + message :], "big")
        if not o.offset <= at < o.offset + o.length:
            return f"an error offset {at} outside the request's {o.length} bytes at {o.offset}"
    return None


def _clip_status(descriptors: memoryview, limit: int) -> bool:
    """Shorten, in place, the last of a status chunk's descriptors where the extents run past
    `limit` bytes (a window's end: the client must not be told of bytes past its export).
    Only the last may (the spec lets the final extent reach past the request); False if
    others do."""
    lengths = array.array("I")
    lengths.frombytes(descriptors)
    if sys.byteorder == "little":
        lengths.byteswap()
    del lengths[1::2]  # the flags
    total = sum(lengths)
    if total <= limit:
        return True
    last = lengths[-1] - (total - limit)
    if last <= 0:
        return False
    _U32.pack_into(descriptors, len(descriptors) - 8, last)
    return True


def _borrowed(part: Buffer) -> bool:
    """A view of memory this relay does not own (the framer's read buffer, or a header)."""
    return isinstance(part, memoryview) and lent(part)


class _ReplyReader(asyncio.BufferedProtocol):
    """Reads the upstream's replies straight into a buffer and relays each whole message."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.pool = relay.s.node.pool
        self.buf = memoryview(lazy_buffer(REPLY_BUFFER))
        self.start = self.end = 0
        self.need = 0  #: the size of the message at `start`, once its header is in
        #: A message longer than BIG being filled in a buffer of its own, and how far.
        self.big: Pooled | None = None
        self.big_size = self.big_filled = 0
        self.into_big = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = self.relay._reader = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.big is not None:
            self.into_big = True
            return memoryview(self.big)[self.big_filled : self.big_size]
        self.into_big = False
        if self.start == self.end:
            self.start = self.end = 0
        elif self.start and (
            len(self.buf) - self.end < BIG or self.start + self.need > len(self.buf)
        ):
            n = self.end - self.start
            self.buf[:n] = self.buf[self.start : self.end]
            self.start, self.end = 0, n
        return self.buf[self.end :]

    def buffer_updated(self, nbytes: int) -> None:
        relay = self.relay
        if self.into_big:
            self.big_filled += nbytes
            if self.big_filled < self.big_size:
                return
            big, size = self.big, self.big_size
            assert big is not None
            self.big = None
            try:
                relay.cut(memoryview(big), 0, size)  # retire it (and renumber a context id)
            except UpstreamFault as exc:
                self.pool.put(big)
                relay._lost(str(exc))
                return
            if not relay.to_client([memoryview(big)[:size]], big, self._resume):
                self._pause()
            relay.room_made()
            return
        self.end += nbytes
        first = self.start
        try:
            self.start, self.need = relay.cut(self.buf, first, self.end)
        except UpstreamFault as exc:
            if exc.at > first:  # the whole messages before the fault were retired: relay them
                relay.to_client([self.buf[first : exc.at]], None, self._resume)
            relay._lost(str(exc))
            return
        sent = True
        if self.start > first:
            sent = relay.to_client([self.buf[first : self.start]], None, self._resume)
        if self.need > BIG:
            # Too long to wait for in this buffer: it goes on in its own (a copy of what came
            # of it so far; the buffer itself is not written while a relay from it waits).
            big = self.big = self.pool.get(self.need)
            have = self.end - self.start
            big[:have] = self.buf[self.start : self.end]
            self.big_size, self.big_filled = self.need, have
            self.start = self.end = self.need = 0
        if not sent:
            self._pause()
        relay.room_made()

    def _pause(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        self.relay._lost("the upstream closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.relay._reader is self.transport:
            self.relay._lost(f"the connection closed ({exc or 'end of stream'})")
        if self.big is not None:
            self.pool.put(self.big)
            self.big = None


class _PollingReplyReader(_ReplyReader):
    """The same, telling the poller (--poll-max-us) when the loop wakes and when it may poll."""

    def buffer_updated(self, nbytes: int) -> None:
        POLLER.woke()
        super().buffer_updated(nbytes)
        POLLER.idle_soon(self.relay.s._loop)
