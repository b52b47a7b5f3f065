"""nodes/server/framing.py, the sans-IO request framer, driven as the event loop drives it.

However the byte stream is cut into reads, the same requests come out in order, each WRITE with
its payload whole; a rejected WRITE's payload is skipped and the stream stays in step; DISC ends
the stream; backpressure stops dispatching and loses nothing; a bad magic or a rejected payload
too big to skip is a ProtocolError. The read buffer holds memory only where reads reached, and
gives it back when it holds nothing unparsed.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodes.base import Landing
from nodes.protocol import transmission as tx
from nodes.protocol.constants import REQUEST, REQUEST_MAGIC, Cmd, Err
from nodes.protocol.errors import ProtocolError
from nodes.server.framing import BIG_WRITE, MAX_FEED, MAX_SKIP, RECV_BUFFER, RequestFramer, lent
from nodes.server.session import BufferPool

Seen = tuple[int, int, Err, bytes | None]  # cmd, cookie, verdict, payload


def header(cmd: int, cookie: int, length: int, offset: int = 0, flags: int = 0) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)


class Harness:
    """A framer whose requests are validated by cookie (odd cookies are rejected), and which
    records what it dispatches and gives payload buffers back to the pool, as the session does."""

    def __init__(self, leftover: bytes = b"") -> None:
        self.pool = BufferPool()
        self.seen: list[Seen] = []
        self.framer = RequestFramer(self.validate, self.dispatch, self.pool, leftover)
        self.blocked = False

    @staticmethod
    def validate(req: tx.Request) -> Err:
        return Err.EINVAL if req.cookie % 2 else Err.OK

    def dispatch(self, req: tx.Request, err: Err, payload: memoryview | Landing | None) -> None:
        data = None
        if isinstance(payload, Landing):
            assert isinstance(payload, PieceLanding)
            data = bytes(payload.buf)
            payload.commit()
        elif payload is not None:
            assert len(payload) == req.length
            data = bytes(payload)
            self.pool.put(payload.obj)  # type: ignore[arg-type]  # reused by the next WRITE
        self.seen.append((req.cmd, req.cookie, err, data))

    def push(self, stream: bytes, cuts: list[int]) -> None:
        """Deliver `stream` in reads of the sizes in `cuts` (cycled), each no bigger than the
        buffer the framer offers, feeding after each read as the protocol callback does (and
        again while a feed stops at MAX_FEED requests, as the session does after a turn of the
        event loop). After each feed, `scatter` may read more of the stream, as the session's
        socket reader does for a landing; then the framer is fed again."""
        pos, i = 0, 0
        while pos < len(stream) and not self.framer.disconnected:
            buf = self.framer.get_buffer()
            assert len(buf) > 0, "an empty buffer would stall the event loop's reads"
            n = min(len(buf), cuts[i % len(cuts)], len(stream) - pos)
            i += 1
            buf[:n] = stream[pos : pos + n]
            self.framer.buffer_updated(n)
            pos += n
            self.feed()
            got = self.scatter(stream, pos)
            if got:
                pos += got
                self.feed()

    def feed(self) -> None:
        while self.framer.feed(lambda: self.blocked):
            pass

    def scatter(self, stream: bytes, pos: int) -> int:
        """Bytes of the stream from `pos` on read outside get_buffer(): none here."""
        return 0


class PieceLanding(Landing):
    """A landing whose views are pieces of one buffer: a first piece of `first` bytes (an
    unaligned write's partial page), then pieces of `piece` bytes."""

    def __init__(self, length: int, first: int, piece: int, window: int = 0) -> None:
        self.buf = bytearray(length)
        self.committed = self.released = False
        cuts = [0, *range(min(first, length), length, piece), length]
        whole = memoryview(self.buf)
        self.pieces = [whole[a:b] for a, b in itertools.pairwise(cuts) if b > a]
        # With a window, the views are made that many at a time, as the memory node's are.
        self.window = window or len(self.pieces)
        self.views = []
        self.more()

    def more(self) -> bool:
        made = len(self.views)
        self.views += self.pieces[made : made + self.window]
        return len(self.views) > made

    def commit(self) -> None:
        self.committed = True

    def release(self) -> None:
        self.released = self.released or not self.committed


class LandingHarness(Harness):
    """The same, landing WRITE payloads of MIN_LANDING bytes or more, and reading the rest of a
    landing's payload in scatter reads as the session's socket reader does."""

    MIN_LANDING = 1000

    def __init__(self, first: int, piece: int, scatter: int, window: int = 0) -> None:
        self.first, self.piece, self.scatter_bytes, self.window = first, piece, scatter, window
        self.landings: list[PieceLanding] = []
        super().__init__()
        self.framer = RequestFramer(self.validate, self.dispatch, self.pool, land=self.land)

    def land(self, req: tx.Request) -> Landing | None:
        if req.length < self.MIN_LANDING:
            return None
        landing = PieceLanding(req.length, self.first, self.piece, self.window)
        self.landings.append(landing)
        return landing

    def scatter(self, stream: bytes, pos: int) -> int:
        """As recvmsg_into would, into the rest of a landing: the socket holds up to
        `scatter_bytes` more."""
        views, room = self.framer.landing_views(), min(self.scatter_bytes, len(stream) - pos)
        if views is None or not room:
            return 0
        got = 0
        for view in views:
            take = min(len(view), room - got)
            view[:take] = stream[pos + got : pos + got + take]
            got += take
        self.framer.payload_received(got)
        return got


class LendingHarness(Harness):
    """The same, with a framer that lends payloads already buffered whole (as a relay's does):
    it records which payloads were lent, copies those and gives only the others to the pool."""

    def __init__(self) -> None:
        super().__init__()
        self.framer = RequestFramer(self.validate, self.dispatch, self.pool, lend_payloads=True)
        self.lent: list[bool] = []

    def dispatch(self, req: tx.Request, err: Err, payload: memoryview | Landing | None) -> None:
        if isinstance(payload, memoryview):
            self.lent.append(lent(payload))
            if self.lent[-1]:
                self.seen.append((req.cmd, req.cookie, err, bytes(payload)))
                return
        super().dispatch(req, err, payload)


request_specs = st.lists(
    st.tuples(
        st.sampled_from([Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.WRITE]),
        st.integers(0, 70000),  # length: payload bytes for a WRITE
        st.booleans(),  # rejected by validate
    ),
    max_size=40,
)


def build(specs: list[tuple[Cmd, int, bool]]) -> tuple[bytes, list[Seen]]:
    stream, expected = bytearray(), []
    for i, (cmd, length, rejected) in enumerate(specs):
        cookie = 2 * i + (1 if rejected else 0)
        stream += header(cmd, cookie, length)
        payload = None
        if cmd == Cmd.WRITE and length:
            data = os.urandom(length)
            stream += data
            payload = None if rejected else data
        expected.append((int(cmd), cookie, Err.EINVAL if rejected else Err.OK, payload))
    return bytes(stream), expected


@settings(max_examples=150, deadline=None)
@given(specs=request_specs, cuts=st.lists(st.integers(1, 300000), min_size=1, max_size=8))
def test_any_cutting_of_the_stream_gives_the_same_requests_and_payloads(specs, cuts):
    stream, expected = build(specs)
    h = Harness()
    h.push(stream, cuts)
    assert h.seen == expected
    assert not h.framer.disconnected


@settings(max_examples=150, deadline=None)
@given(
    specs=request_specs,
    cuts=st.lists(st.integers(1, 300000), min_size=1, max_size=8),
    first=st.integers(1, 40000),
    piece=st.integers(1, 40000),
    scatter=st.integers(0, 300000),
    window=st.integers(0, 4),
)
def test_payloads_landed_in_pieces_come_out_the_same_however_the_stream_is_cut(
    specs, cuts, first, piece, scatter, window
):
    """Landed payloads, filled from the read buffer, through get_buffer() a piece at a time
    and by scatter reads in any mix, are the bytes sent, whether the landing made its views
    up front or a few at a time (Landing.more); each landing is committed once."""
    stream, expected = build(specs)
    h = LandingHarness(first, piece, scatter, window)
    h.push(stream, cuts)
    assert h.seen == expected
    landed = [len(data) for cmd, _, err, data in expected if data is not None and len(data) >= 1000]
    assert [len(landing.buf) for landing in h.landings] == landed
    assert all(landing.committed for landing in h.landings)


def test_only_a_payload_in_the_read_buffer_is_lent_never_a_pooled_one():
    """lent() is what keeps the read buffer out of the pool: True for an accepted payload that
    came whole behind its header (a big one, too, is followed by a read of one header), False
    for one read into a pooled buffer, small (a bytearray) or big (lazy pages); a rejected
    payload is skipped, lent to no one."""
    small, big = os.urandom(1000), os.urandom(2 * RECV_BUFFER)
    h = LendingHarness()
    h.push(header(Cmd.WRITE, 2, BIG_WRITE) + big[:BIG_WRITE], [RECV_BUFFER])
    assert len(h.framer.get_buffer()) == REQUEST.size
    rejected = header(Cmd.WRITE, 5, len(small)) + small
    h.push(header(Cmd.WRITE, 4, len(small)) + small + rejected + header(Cmd.WRITE, 6, len(small)),
           [RECV_BUFFER])  # fmt: skip
    h.push(small, [RECV_BUFFER])  # the payload of 6 comes in a read of its own
    h.push(header(Cmd.WRITE, 8, len(big)) + big, [RECV_BUFFER])  # longer than the read buffer
    assert h.lent == [True, True, False, False]
    payloads = {2: big[:BIG_WRITE], 4: small, 5: None, 6: small, 8: big}
    assert h.seen == [(int(Cmd.WRITE), cookie, Err.EINVAL if cookie == 5 else Err.OK, payload)
                      for cookie, payload in payloads.items()]  # fmt: skip


def test_landing_views_are_the_rest_of_the_landing_until_the_payload_is_all_there():
    """With nothing of the stream buffered ahead, one scatter read may fill all that is left of
    a landing: landing_views() offers every view from where the payload has got to. Once the
    payload is all there, there is nothing to offer."""
    data = os.urandom(20000)
    h = LandingHarness(first=100, piece=4096, scatter=0)
    h.push(header(Cmd.WRITE, 2, len(data)) + data[:300], [RECV_BUFFER])
    views = h.framer.landing_views()
    assert views is not None and sum(len(view) for view in views) == len(data) - 300
    pos = 300
    for view in views:
        view[:] = data[pos : pos + len(view)]
        pos += len(view)
    h.framer.payload_received(len(data) - 300)
    assert h.framer.landing_views() is None
    h.feed()
    assert h.seen == [(int(Cmd.WRITE), 2, Err.OK, data)]


def test_more_payload_reported_than_the_landing_takes_is_an_error_not_a_hang():
    # A reader that reports more bytes than the views it was given is a bug: it must surface,
    # not spin on views with no room left.
    h = LandingHarness(first=100, piece=4096, scatter=0)
    h.push(header(Cmd.WRITE, 2, 2000), [RECV_BUFFER])
    assert h.framer.landing_views() is not None
    with pytest.raises(RuntimeError, match="ran past the views"):
        h.framer.payload_received(3000)


def test_release_gives_back_a_landing_still_being_filled():
    h = LandingHarness(first=100, piece=4096, scatter=0)
    h.push(header(Cmd.WRITE, 2, 8192) + bytes(300), [4096])
    (landing,) = h.landings
    assert not landing.released
    h.framer.release()
    assert landing.released and not landing.committed
    assert h.seen == []


@settings(max_examples=50, deadline=None)
@given(specs=request_specs, split=st.integers(0, 200))
def test_bytes_left_over_from_the_handshake_are_framed_first(specs, split):
    stream, expected = build(specs)
    split = min(split, len(stream))
    h = Harness(leftover=stream[:split])
    h.framer.feed(lambda: False)
    h.push(stream[split:], [4096])
    assert h.seen == expected


def test_disc_ends_the_stream_and_nothing_after_it_is_dispatched():
    h = Harness()
    stream = header(Cmd.READ, 2, 512) + header(Cmd.DISC, 4, 0) + header(Cmd.READ, 6, 512)
    h.framer.get_buffer()[: len(stream)] = stream
    h.framer.buffer_updated(len(stream))
    # False, then and ever after: there is no more to feed (True would have it called again).
    assert h.framer.feed(lambda: False) is False
    assert h.framer.feed(lambda: False) is False
    assert h.seen == [(int(Cmd.READ), 2, Err.OK, None)]
    assert h.framer.disconnected


def test_backpressure_stops_dispatching_and_the_rest_follows_when_released():
    specs = [(Cmd.WRITE, 5000, False), (Cmd.READ, 4096, False), (Cmd.WRITE, 300, False)]
    stream, expected = build(specs)  # type: ignore[arg-type]
    h = Harness()
    h.blocked = True
    h.push(stream, [len(stream)])  # all of it read, none of it dispatched yet
    assert h.seen == []
    h.blocked = False
    h.framer.feed(lambda: h.blocked)
    assert h.seen == expected


def test_one_feed_dispatches_at_most_max_feed_requests_and_the_next_goes_on():
    """A read full of requests is dispatched MAX_FEED at a time: the session lets the event
    loop serve the other connections between two feeds."""
    specs = [(Cmd.READ, 512, False)] * (2 * MAX_FEED + 10)
    stream, expected = build(specs)  # type: ignore[arg-type]
    h = Harness()
    h.framer.get_buffer()[: len(stream)] = stream
    h.framer.buffer_updated(len(stream))
    assert h.framer.feed(lambda: False) is True
    assert h.seen == expected[:MAX_FEED]
    assert h.framer.feed(lambda: False) is True
    assert h.framer.feed(lambda: False) is False
    assert h.seen == expected


def test_headers_cut_at_the_end_of_the_read_buffer_are_moved_to_its_front_and_parsed_whole():
    """Reads of 100,000 bytes of 28-byte headers leave part of a header at the end each time;
    when the free space runs low the framer moves it to the front of the buffer."""
    specs = [(Cmd.READ, 512, i % 7 == 0) for i in range(20000)]
    stream, expected = build(specs)  # type: ignore[arg-type]
    h = Harness()
    h.push(stream, [100000])
    assert h.seen == expected


def test_a_read_that_fills_the_buffer_to_its_end_inside_a_header_leaves_room_for_the_next():
    """A read can take the whole read buffer and end part way into a header: that part is moved
    to the front, or the next read would get no room at all and the connection would stall."""
    specs = [(Cmd.READ, 512, False)] * (2 * RECV_BUFFER // REQUEST.size)
    stream, expected = build(specs)  # type: ignore[arg-type]
    assert RECV_BUFFER % REQUEST.size, "the first read must end inside a header"
    h = Harness()
    h.push(stream, [RECV_BUFFER])
    assert h.seen == expected


def test_a_payload_is_read_straight_into_its_buffer_once_the_read_buffer_is_empty():
    h = Harness()
    data = os.urandom(3 * RECV_BUFFER)
    h.push(header(Cmd.WRITE, 2, len(data)), [32])
    target = h.framer.get_buffer()
    assert len(target) == len(data)  # the payload's own buffer, not the read buffer
    h.push(data, [RECV_BUFFER // 3])
    assert h.seen == [(int(Cmd.WRITE), 2, Err.OK, data)]


def test_after_a_big_write_only_the_next_header_is_read_so_its_payload_is_not_copied():
    """A big WRITE's payload that came in the read buffer behind its header is copied out of
    it; after one big WRITE the framer reads just the next header, so a second one's payload
    goes straight into its own buffer. After a small request, reads are whole again."""
    h = Harness()
    first, second = os.urandom(BIG_WRITE), os.urandom(BIG_WRITE)
    h.push(header(Cmd.WRITE, 2, BIG_WRITE) + first, [RECV_BUFFER])
    assert len(h.framer.get_buffer()) == REQUEST.size
    h.push(header(Cmd.WRITE, 4, BIG_WRITE), [RECV_BUFFER])
    assert len(h.framer.get_buffer()) == BIG_WRITE  # the payload's own buffer
    h.push(second, [RECV_BUFFER])
    assert len(h.framer.get_buffer()) == REQUEST.size
    h.push(header(Cmd.FLUSH, 6, 0), [RECV_BUFFER])
    assert len(h.framer.get_buffer()) == RECV_BUFFER
    h.push(header(Cmd.WRITE, 8, BIG_WRITE - 1) + first[1:], [RECV_BUFFER])
    assert len(h.framer.get_buffer()) == RECV_BUFFER  # not big: small requests share reads
    assert h.seen == [(int(Cmd.WRITE), 2, Err.OK, first), (int(Cmd.WRITE), 4, Err.OK, second),
                      (int(Cmd.FLUSH), 6, Err.OK, None),
                      (int(Cmd.WRITE), 8, Err.OK, first[1:])]  # fmt: skip


@pytest.mark.parametrize(
    "stream, why",
    [
        (REQUEST.pack(0xDEADBEEF, 0, Cmd.READ, 2, 0, 512), "bad request magic"),
        (header(Cmd.WRITE, 1, MAX_SKIP + 1), "too big"),
    ],
)
def test_a_stream_that_cannot_be_followed_is_a_protocol_error(stream: bytes, why: str):
    h = Harness()
    with pytest.raises(ProtocolError, match=why):
        h.push(stream, [len(stream)])


def test_a_rejected_payload_of_max_skip_bytes_is_still_skipped():
    # MAX_SKIP is the largest payload skipped: only a longer one ends the connection.
    h = Harness()
    h.push(header(Cmd.WRITE, 1, MAX_SKIP) + bytes(1000), [RECV_BUFFER])
    assert h.seen == [] and not h.framer.disconnected


def test_release_gives_a_half_filled_payload_buffer_back():
    h = Harness()
    h.push(header(Cmd.WRITE, 2, 8192) + bytes(100), [4096])
    pooled: Callable[[], int] = lambda: h.pool._pooled  # noqa: E731
    before = pooled()
    h.framer.release()
    assert pooled() == before + 8192


# Memory -------------------------------------------------------------------------------------


def resident_pages(view: memoryview) -> int:
    """Pages under `view` the kernel backs with memory (the present bit of /proc/self/pagemap)."""
    address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    page = os.sysconf("SC_PAGE_SIZE")
    first, last = address // page, (address + len(view) - 1) // page
    count = last - first + 1
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = struct.unpack(f"{count}Q", pagemap.read(count * 8))
    return sum(entry >> 63 for entry in entries)


def whole_read_buffer(h: Harness) -> memoryview:
    """The read buffer from its start (get_buffer() rewinds an empty one)."""
    view = h.framer.get_buffer()
    assert len(view) == RECV_BUFFER
    return view


def test_the_read_buffer_holds_memory_only_where_reads_reached():
    """An idle connection's 256 KiB read buffer costs nothing (a zero-filled bytearray cost all
    of it); 100 small requests in one read, one page."""
    h = Harness()
    assert resident_pages(whole_read_buffer(h)) == 0
    h.push(header(Cmd.READ, 2, 512) * 100, [RECV_BUFFER])
    assert resident_pages(whole_read_buffer(h)) == 1


def test_dropping_idle_pages_gives_back_what_reads_reached_and_framing_goes_on():
    specs = [(Cmd.READ, 512, False)] * 4000  # 112,000 bytes in one read: 28 pages
    stream, expected = build(specs)  # type: ignore[arg-type]
    h = Harness()
    h.push(stream, [len(stream)])
    assert resident_pages(whole_read_buffer(h)) >= len(stream) // 4096
    h.framer.drop_idle_pages()
    assert resident_pages(whole_read_buffer(h)) == 0
    h.push(stream, [len(stream)])
    assert h.seen == expected + expected


def test_dropping_idle_pages_keeps_a_header_not_yet_parsed():
    """Half a header waits in the buffer for its other half: its pages stay as they are."""
    stream = header(Cmd.READ, 2, 512) + header(Cmd.READ, 4, 512)
    h = Harness()
    h.push(stream[:40], [40])
    h.framer.drop_idle_pages()
    h.push(stream[40:], [16])
    assert h.seen == [(int(Cmd.READ), 2, Err.OK, None), (int(Cmd.READ), 4, Err.OK, None)]
