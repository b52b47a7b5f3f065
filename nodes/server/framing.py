"""Framing of the transmission phase: the client's byte stream cut into requests.

Sans-IO, in the shape of asyncio's BufferedProtocol: whoever reads the socket asks
`get_buffer()` where the next bytes go, reports them with `buffer_updated(n)`, then calls
`feed()` to hand each complete request to `dispatch`. Request headers are parsed out of one
buffer (many small requests per read); a WRITE payload goes to a pooled buffer, or to the
views of a Landing the backend offers, straight from the socket once the read buffer is empty;
a rejected WRITE's payload is skipped so the stream stays in step.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..base import Landing
from ..protocol import transmission as tx
from ..protocol.constants import REQUEST, Cmd, Err
from ..protocol.errors import ProtocolError
from .pages import Pooled, PooledPages, lazy_buffer

if TYPE_CHECKING:
    from .session import BufferPool

#: The read buffer's size: one read takes up to this much. Its pages are backed only once a read
#: reaches them (pages.py), and given back once the connection idles (drop_idle_pages): an idle
#: connection costs none of it.
RECV_BUFFER = 256 * 1024
#: Free space below which the read buffer is compacted before the next read.
MIN_ROOM = 64 * 1024
#: A rejected WRITE payload larger than this is not skipped: the client is disconnected.
MAX_SKIP = 64 * 1024 * 1024
#: After a WRITE payload of at least this many bytes, the next read takes one request header
#: only: if that is another big WRITE, its payload lands straight in its own buffer instead of
#: filling the read buffer behind the header, to be copied out of it (a copy of up to
#: RECV_BUFFER bytes, against one more read of the socket; callgrind: 256K writes cost 30 %
#: fewer instructions per request). Small requests keep sharing one read.
BIG_WRITE = 64 * 1024
#: Requests one feed() dispatches at most. The rest waits for the next call, which the caller
#: makes after a turn of the event loop: one client's deep pipeline (a TCP socket holds
#: megabytes of requests, and the loop may read a full socket many times over in one go) must
#: not keep the loop, and so every other client, waiting.
MAX_FEED = 256
_FEED = range(MAX_FEED)
#: Views one scatter read fills at most (a 4 MiB landing: 128 pages).
_SCATTER = 128
_HEADER = REQUEST.size
_WRITE, _DISC = int(Cmd.WRITE), int(Cmd.DISC)

#: Called with each request, the verdict of `validate` on it, and for an accepted WRITE its
#: payload: a view of exactly its length into a pooled buffer (`view.obj`), which the callee
#: gives back to the pool when done with it; or, from a framer that lends payloads, possibly a
#: view into the framer's own read buffer (see `lent`), valid only until feed() returns; or,
#: from a framer that lands payloads, the Landing they were received into, which the callee
#: commits or releases.
Dispatch = Callable[[tx.Request, Err, "memoryview | Landing | None"], None]
#: Asked where an accepted WRITE's payload (not yet buffered) goes: a Landing, or None for a
#: pooled buffer.
Land = Callable[[tx.Request], "Landing | None"]


def lent(payload: memoryview) -> bool:
    """A payload view into the framer's read buffer (not a pooled buffer): the callee must be
    done with it, or have copied it, when feed() returns, and must not give it to the pool."""
    return not isinstance(payload.obj, (bytearray, PooledPages))


class RequestFramer:
    def __init__(
        self,
        validate: Callable[[tx.Request], Err],
        dispatch: Dispatch,
        pool: BufferPool,
        leftover: bytes = b"",
        lend_payloads: bool = False,
        land: Land | None = None,
    ) -> None:
        self._validate = validate
        #: An accepted WRITE whose payload is already buffered whole is dispatched with a view
        #: of it in the read buffer, not a pooled copy (a relay sends it on before feed() ends).
        self._lend = lend_payloads
        self._land = land
        self._dispatch = dispatch
        self._pool = pool
        self._pages = lazy_buffer(RECV_BUFFER)
        self._buf = memoryview(self._pages)
        self._start = 0
        self._end = len(leftover)
        self._buf[: self._end] = leftover
        #: The WRITE whose payload is being collected, its verdict, buffer and progress.
        self._req: tx.Request | None = None
        self._err = Err.OK
        self._payload: Pooled | None = None
        self._landing: Landing | None = None
        #: Where the payload goes: one view of a pooled buffer, or a landing's views in
        #: order; empty while a rejected payload is skipped.
        self._targets: list[memoryview] = []
        self._at = 0  #: the view being filled
        self._at_filled = 0  #: bytes in it
        self._filled = 0  #: payload bytes collected (or skipped, when rejected)
        self._into_payload = False  #: the last get_buffer() handed out the payload itself
        self._header_next = False  #: read only a header next (a big WRITE came last)
        #: NBD_CMD_DISC arrived: nothing after it is read.
        self.disconnected = False

    def get_buffer(self) -> memoryview:
        """Where the next bytes from the socket go."""
        if self._targets and self._start == self._end:
            # Nothing buffered ahead of the payload: the socket fills it directly.
            self._into_payload = True
            return self._targets[self._at][self._at_filled :]
        self._into_payload = False
        if self._start == self._end:
            self._start = self._end = 0
            if self._header_next:
                self._header_next = False
                return self._buf[:_HEADER]
        elif self._start and len(self._buf) - self._end < MIN_ROOM:
            # Move the unparsed tail to the front: usually part of one header, since feed()
            # consumes all it can, and reading pauses while it may not.
            n = self._end - self._start
            self._buf[:n] = self._buf[self._start : self._end]
            self._start, self._end = 0, n
        return self._buf[self._end :]

    def buffer_updated(self, n: int) -> None:
        if self._into_payload:
            self._advance(n)
        else:
            self._end += n

    def landing_views(self) -> list[memoryview] | None:
        """The rest of a landing's views, when the socket is to fill them next (nothing of
        the stream buffered ahead): one scatter read (recvmsg_into) takes what the socket
        holds of the payload, where get_buffer() offers one page at a time. Report what it
        read with payload_received()."""
        if self._landing is None or self._start != self._end:
            return None
        assert self._req is not None
        if self._filled == self._req.length:
            return None
        at, targets = self._at, self._targets
        return [targets[at][self._at_filled :], *targets[at + 1 : at + _SCATTER]]

    def payload_received(self, n: int) -> None:
        """`n` bytes went straight into landing_views()."""
        self._advance(n)

    def _advance(self, n: int) -> None:
        """`n` payload bytes are in place, from the current view on."""
        self._filled += n
        targets = self._targets
        while n:
            take = min(n, len(targets[self._at]) - self._at_filled)
            if not take:
                raise RuntimeError("a WRITE payload ran past the views it lands in")
            self._at_filled += take
            n -= take
            if self._at_filled == len(targets[self._at]) and (
                self._at + 1 < len(targets)
                # the landing's next views, made once the payload has reached them
                or (self._landing is not None and self._landing.more())
            ):
                self._at += 1
                self._at_filled = 0

    def feed(self, blocked: Callable[[], bool]) -> bool:
        """Dispatch the complete requests buffered, until the buffer runs dry, `blocked()` says
        to wait (backpressure), DISC, or MAX_FEED of them: then True (more may be buffered;
        call again after the event loop has run). Raises ProtocolError for a stream that cannot
        be followed (bad magic, a rejected payload too big to skip)."""
        for _ in _FEED:  # a bound at the cost of one step of a range iterator per request
            if self.disconnected:
                return False
            if self._req is not None:
                if blocked() or not self._collect():
                    return False
                req, err = self._req, self._err
                payload = self._landing or (self._targets[0] if self._targets else None)
                self._req = self._payload = self._landing = None
                self._targets = []
                self._dispatch(req, err, payload)
                continue
            if self._end - self._start < _HEADER or blocked():
                return False
            req = tx.parse_request(self._buf[self._start : self._start + _HEADER])
            self._start += _HEADER
            err = self._validate(req)
            if req.cmd == _DISC:
                self.disconnected = True
                return False
            if req.cmd == _WRITE and req.length:
                start = self._start
                if self._lend and err is Err.OK and self._end - start >= req.length:
                    self._start = start + req.length
                    self._header_next = req.length >= BIG_WRITE
                    self._dispatch(req, err, self._buf[start : self._start])
                    continue
                self._begin_payload(req, err)
                continue
            self._dispatch(req, err, None)
        return True

    def _begin_payload(self, req: tx.Request, err: Err) -> None:
        self._req, self._err, self._filled = req, err, 0
        self._at = self._at_filled = 0
        self._header_next = req.length >= BIG_WRITE
        if err is Err.OK:
            landing = self._land(req) if self._land is not None else None
            if landing is not None:
                self._landing, self._targets = landing, landing.views
            else:
                self._payload = self._pool.get(req.length)
                self._targets = [memoryview(self._payload)[: req.length]]
        elif req.length > MAX_SKIP:
            # Reading gigabytes just to stay in step is a DoS; the spec lets a server
            # hard-disconnect on an over-sized payload (nbdkit does too).
            raise ProtocolError(f"WRITE payload of {req.length} bytes is too big")

    def _collect(self) -> bool:
        """Move buffered payload bytes into place (or past them); True once all are there."""
        assert self._req is not None
        want = self._req.length - self._filled
        n = min(want, self._end - self._start)
        if n and self._targets:
            pos = self._start
            while pos < self._start + n:  # into the views in turn (one, unless landing)
                view, at = self._targets[self._at], self._at_filled
                take = min(self._start + n - pos, len(view) - at)
                view[at : at + take] = self._buf[pos : pos + take]
                self._advance(take)
                pos += take
            self._start += n
        elif n:  # a rejected payload: skipped
            self._start += n
            self._filled += n
        return self._filled == self._req.length

    def drop_idle_pages(self) -> None:
        """Give the read buffer's pages back to the kernel if it holds nothing unparsed: a
        connection that went idle keeps none of what its busy spells touched (the next reads
        fault them in again, zero-filled). Only between reads: on the event loop, never while
        a read into the buffer is under way."""
        if self._start == self._end:
            self._start = self._end = 0
            self._pages.madvise(mmap.MADV_DONTNEED)

    def release(self) -> None:
        """Give back a payload buffer or landing still being filled (the connection ended)."""
        if self._payload is not None:
            self._pool.put(self._payload)
        if self._landing is not None:
            self._landing.release()
        self._payload = self._landing = None
        self._targets = []
