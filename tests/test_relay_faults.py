"""An upstream that breaks the protocol, behind a hop: the relay (`nbd relay=true`) and the
re-issuing hop (`relay=false`, libnbd) must each answer the request it spoiled with an error,
never pass the bad message on, never hang, and serve again once the upstream is reconnected.

The upstream here is a small server on our own sans-IO handshake: it keeps its data in a
bytearray and answers every request correctly but a READ (or a BLOCK_STATUS) at POISON, which
gets the reply of the fault under test. Each connection (the node's own, then the one opened
per client) answers the same way, so the first bad reply after a reconnect comes only with the
next request at POISON.
"""

from __future__ import annotations

import errno
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nbd
import pytest
from conftest import nbd_connect, wait_for

from nodes.protocol.constants import TFlag
from nodes.protocol.handshake import (
    NEED_DATA,
    Closed,
    ExportInfo,
    HandshakePolicy,
    Ready,
    ServerHandshake,
)

SIZE = 1 << 20
#: READs of random replies per seed (NBDFABRIC_FUZZ_SECONDS scales it for long runs).
ROUNDS = int(40 * max(1.0, float(os.environ.get("NBDFABRIC_FUZZ_SECONDS") or 1)))
POISON = 64 * 1024  #: a READ here gets the faulty reply
SIMPLE, CHUNK = 0x67446698, 0x668E33EF
DONE = 1
DATA, HOLE, NONE, STATUS, ERROR, ERROR_OFFSET = 1, 2, 0, 5, 32769, 32770
READ, WRITE, DISC, BLOCK_STATUS = 0, 1, 2, 7


def chunk(cookie: int, kind: int, payload: bytes, flags: int = DONE) -> bytes:
    return struct.pack(">IHHQI", CHUNK, flags, kind, cookie, len(payload)) + payload


def data(cookie: int, offset: int, body: bytes, flags: int = DONE) -> bytes:
    return chunk(cookie, DATA, struct.pack(">Q", offset) + body, flags)


#: The faults: (cookie, offset, length, the data there) -> what the upstream sends instead of
#: the READ's reply. Structured replies are negotiated unless the name says otherwise.
FAULTS: dict[str, Callable[[int, int, int, bytes], bytes]] = {
    "data before the request": lambda c, o, n, d: data(c, o - 512, d),
    "data past the request": lambda c, o, n, d: data(c, o, d + bytes(512)),
    # a chunk that says 4 GiB follows, and nothing does: must not be waited for
    "a 4 GiB chunk": lambda c, o, n, d: struct.pack(">IHHQI", CHUNK, DONE, DATA, c, 0xFFFFFFFF),
    "a hole of the wrong size": lambda c, o, n, d: chunk(c, HOLE, struct.pack(">QII", o, n, 0)),
    "a hole past the request": lambda c, o, n, d: chunk(c, HOLE, struct.pack(">QI", o, n + 512)),
    "an unknown chunk type": lambda c, o, n, d: chunk(c, 7, b"") + data(c, o, d),
    "a status chunk for a READ": lambda c, o, n, d: chunk(c, STATUS, struct.pack(">III", 1, n, 0)),
    "NONE not last": lambda c, o, n, d: chunk(c, NONE, b"", 0) + data(c, o, d),
    "half the range, then DONE": lambda c, o, n, d: data(c, o, d[: n // 2]),
    # as many bytes as the READ asked for, and its last quarter never sent
    "overlapping data chunks": lambda c, o, n, d: (
        data(c, o, d[: n // 2], 0) + data(c, o + n // 4, d[n // 4 : 3 * n // 4])
    ),
    "a hole over data": lambda c, o, n, d: (
        data(c, o, d[: n // 2], 0) + chunk(c, HOLE, struct.pack(">QI", o, n // 2))
    ),
    "a reply to another cookie": lambda c, o, n, d: data(c ^ 0x5A5A, o, d),
    "a simple reply with data": lambda c, o, n, d: struct.pack(">IIQ", SIMPLE, 0, c) + d,
    "a simple error reply": lambda c, o, n, d: struct.pack(">IIQ", SIMPLE, 5, c),
    "an error chunk with error 0": lambda c, o, n, d: chunk(c, ERROR, struct.pack(">IH", 0, 0)),
    "an error offset past the request": lambda c, o, n, d: chunk(
        c, ERROR_OFFSET, struct.pack(">IHQ", 5, 0, o + n + 4096)
    ),
    "an error message longer than its chunk": lambda c, o, n, d: chunk(
        c, ERROR, struct.pack(">IH", 5, 100) + b"short"
    ),
    "bad magic": lambda c, o, n, d: struct.pack(">IIQ", 0x12345678, 0, c),
    "a chunk without structured replies": lambda c, o, n, d: data(c, o, d),
}


def status(cookie: int, extents: bytes, flags: int = DONE) -> bytes:
    return chunk(cookie, STATUS, struct.pack(">I", 1) + extents, flags)


#: The same for a BLOCK_STATUS at POISON: (cookie, offset, length) -> what is sent instead.
STATUS_FAULTS: dict[str, Callable[[int, int, int], bytes]] = {
    "a descriptor cut short": lambda c, o, n: status(c, struct.pack(">II", n, 0) + b"\0\0\0"),
    "no descriptor": lambda c, o, n: status(c, b""),
    "data for a BLOCK_STATUS": lambda c, o, n: data(c, o, bytes(n)),
    "a simple reply": lambda c, o, n: struct.pack(">IIQ", SIMPLE, 0, c),
    "NONE alone": lambda c, o, n: chunk(c, NONE, b""),
    # the one context negotiated, answered twice: whose bytes would the second one describe?
    "two status chunks": lambda c, o, n: (
        status(c, struct.pack(">II", n, 0), 0) + status(c, struct.pack(">II", n, 1))
    ),
}

#: Replies to a BLOCK_STATUS with REQ_ONE that break it (one extent, no longer than asked).
REQ_ONE_FAULTS: dict[str, Callable[[int, int, int], bytes]] = {
    "two extents": lambda c, o, n: status(c, struct.pack(">IIII", n // 2, 0, n // 2, 1)),
    "an extent longer than asked": lambda c, o, n: status(c, struct.pack(">II", 2 * n, 0)),
}

#: Replies to a READ with DF (at most one content chunk): (fault, the bytes it describes).
DF_REPLIES: dict[str, tuple[Callable[[int, int, int, bytes], bytes], Callable[[bytes], bytes]]] = {
    "two data chunks": (
        lambda c, o, n, d: data(c, o, d[: n // 2], 0) + data(c, o + n // 2, d[n // 2 :]),
        lambda d: d,
    ),
    "a hole, then data": (
        lambda c, o, n, d: (
            chunk(c, HOLE, struct.pack(">QI", o, n // 2), 0) + data(c, o + n // 2, d[len(d) // 2 :])
        ),
        lambda d: bytes(len(d) // 2) + d[len(d) // 2 :],
    ),
    # valid: one content chunk, which may be a hole
    "one hole chunk": (
        lambda c, o, n, d: chunk(c, HOLE, struct.pack(">QI", o, n)),
        lambda d: bytes(len(d)),
    ),
}


class RogueUpstream:
    """The upstream: a thread that accepts on a unix socket, a thread per connection."""

    def __init__(
        self,
        path: Path,
        fault: Callable[[int, int, int, bytes], bytes] | None = None,
        status_fault: Callable[[int, int, int], bytes] | None = None,
    ) -> None:
        self.path, self.fault, self.status_fault = path, fault, status_fault
        self.disk = bytearray(SIZE)
        self.poisoned = 0  #: faulty replies sent
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.path}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                structured = self._handshake(conn)
                if structured is not None:
                    self._transmit(conn, structured)
            except (OSError, ConnectionError):
                pass

    def _handshake(self, conn: socket.socket) -> bool | None:
        flags = (TFlag.SEND_FLUSH | TFlag.SEND_TRIM | TFlag.SEND_WRITE_ZEROES
                 | TFlag.SEND_FUA | TFlag.SEND_DF | TFlag.SEND_CACHE)  # fmt: skip
        export = ExportInfo(name="", size=SIZE, tflags=flags)
        hs = ServerHandshake(HandshakePolicy(lookup=lambda name: export))
        while True:
            event = hs.next_event()
            conn.sendall(hs.data_to_send())
            if event is NEED_DATA:
                more = conn.recv(65536)
                if not more:
                    return None
                hs.receive_data(more)
            elif isinstance(event, Ready):
                assert not event.leftover
                return event.structured
            elif isinstance(event, Closed):
                return None

    def _transmit(self, conn: socket.socket, structured: bool) -> None:
        def exactly(n: int) -> bytes:
            out = b""
            while len(out) < n:
                piece = conn.recv(n - len(out))
                if not piece:
                    raise ConnectionError("closed")
                out += piece
            return out

        while True:
            _, _, cmd, cookie, offset, length = struct.unpack(">IHHQQI", exactly(28))
            if cmd == DISC:
                return
            if cmd == WRITE:
                self.disk[offset : offset + length] = exactly(length)
            if cmd == BLOCK_STATUS:  # all data, in one extent
                if offset == POISON and self.status_fault is not None:
                    self.poisoned += 1
                    conn.sendall(self.status_fault(cookie, offset, length))
                else:
                    conn.sendall(status(cookie, struct.pack(">II", length, 0)))
                continue
            if cmd != READ:
                conn.sendall(struct.pack(">IIQ", SIMPLE, 0, cookie))
                continue
            body = bytes(self.disk[offset : offset + length])
            if offset == POISON and self.fault is not None:
                self.poisoned += 1
                conn.sendall(self.fault(cookie, offset, length, body))
            elif structured:
                conn.sendall(data(cookie, offset, body))
            else:
                conn.sendall(struct.pack(">IIQ", SIMPLE, 0, cookie) + body)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def rogue(tmp_path: Path) -> Iterator[Callable[..., RogueUpstream]]:
    made: list[RogueUpstream] = []

    def make(
        fault: Callable[[int, int, int, bytes], bytes] | None = None,
        status_fault: Callable[[int, int, int], bytes] | None = None,
    ) -> RogueUpstream:
        up = RogueUpstream(tmp_path / "rogue.sock", fault, status_fault)
        made.append(up)
        return up

    yield make
    for up in made:
        up.close()


def pread_within(h, length: int, offset: int, seconds: float = 20) -> bytes:
    """A READ that must be answered (data, or nbd.Error) within `seconds`: a hop that waits
    for bytes the upstream never sends fails here, not by hanging the test."""
    # filled with what no reply carries, and not zeroed by libnbd: a byte the reply leaves
    # uncovered shows
    h.set_pread_initialize(False)
    buf = nbd.Buffer.from_bytearray(bytearray(b"\xa5") * length)
    cookie = h.aio_pread(buf, offset)
    deadline = time.monotonic() + seconds
    while not h.aio_command_completed(cookie):  # raises nbd.Error for a failed command
        assert time.monotonic() < deadline, f"the READ at {offset} was never answered"
        h.poll(100)
    return bytes(buf.to_bytearray())


def pread_df(h, length: int, offset: int, seconds: float = 20) -> tuple[bytes, int]:
    """A READ with DF, answered within `seconds`: (the data, how many content chunks)."""
    buf = nbd.Buffer.from_bytearray(bytearray(b"\xa5") * length)
    chunks = []
    cookie = h.aio_pread_structured(
        buf, offset, lambda sub, off, st, err: chunks.append(st) or 0, flags=nbd.CMD_FLAG_DF
    )
    deadline = time.monotonic() + seconds
    while not h.aio_command_completed(cookie):
        assert time.monotonic() < deadline, f"the READ at {offset} was never answered"
        h.poll(100)
    return bytes(buf.to_bytearray()), len(chunks)


class Seen(list[list[int]]):
    """A block status callback that keeps each reply's entries."""

    def __call__(self, metacontext: str, offset: int, entries: list[int], err: int) -> int:
        self.append(entries)
        return 0


#: The re-issuing hop talks to its upstream with structured replies whatever the client
#: negotiated: a chunk is no fault there.
CASES = [(f, r) for f in FAULTS for r in ("true", "false") if r == "true" or "without" not in f]


@pytest.mark.parametrize(("fault", "relay"), CASES)
def test_relay_faults_an_upstream_breaking_the_protocol_costs_one_request(
    start_node, rogue, fault: str, relay: str
) -> None:
    up = rogue(FAULTS[fault])
    hop = start_node("nbd", f"relay={relay}", upstreams=[up.uri], env={"NBDFABRIC_LOG": "info"})
    structured = "without structured" not in fault
    h = nbd_connect(hop.uri, structured=structured)
    try:
        good = bytes(range(256)) * 1024
        h.pwrite(good, 0)  # 256 KiB: POISON and the bytes around it
        assert pread_within(h, 4096, 0) == good[:4096]
        assert ("relayed to" in hop.stderr()) == (relay == "true"), hop.stderr()
        with pytest.raises(nbd.Error) as failed:
            pread_within(h, 4096, POISON)
        # an errno: the hop answered with an error; the client's libnbd, given the bad
        # message itself, would have raised without one and its connection would be dead
        # (the re-issuing hop passes on what its libnbd made of the fault: EIO, or EINVAL
        # for libnbd's EPROTO, which NBD has no code for)
        assert failed.value.errnum == errno.EIO or relay == "false", failed.value
        assert failed.value.errnum, failed.value
        assert up.poisoned >= 1
        assert hop.proc.poll() is None, "the hop died"
        if relay == "true":  # it saw the fault itself (libnbd, below a re-issuing hop, may
            # fail only the one command and keep its connection)
            assert "lost" in hop.stderr(), hop.stderr()

        def serves() -> bool:
            try:
                return pread_within(h, 8192, 4096) == good[4096 : 4096 + 8192]
            except nbd.Error:
                return False  # down until the upstream is reconnected

        wait_for(serves, 20, "the hop to serve again")
        h.pwrite(b"\xee" * 4096, 8192)
        assert pread_within(h, 4096, 8192) == b"\xee" * 4096
        assert up.disk[8192 : 8192 + 4096] == b"\xee" * 4096
    finally:
        h.shutdown()


def test_relay_faults_the_replies_before_a_fault_in_the_same_read_are_relayed(
    start_node, rogue
) -> None:
    """The upstream sends a READ's whole reply and garbage behind it, in one write: the relay
    cuts (and counts as answered) the reply, then meets the garbage. The reply must still
    reach the client; it used to be dropped with the rest of that read, and the READ, no
    longer outstanding, was never answered at all."""
    up = rogue(lambda c, o, n, d: data(c, o, d) + struct.pack(">IIQ", 0x12345678, 0, 0))
    hop = start_node("nbd", "relay=true", upstreams=[up.uri], env={"NBDFABRIC_LOG": "info"})
    h = nbd_connect(hop.uri)
    try:
        good = bytes(range(256)) * 1024
        h.pwrite(good, 0)
        assert pread_within(h, 4096, POISON) == good[POISON : POISON + 4096]
        wait_for(lambda: "lost" in hop.stderr(), 10, "the relay to drop the upstream")
        wait_for(lambda: "is back" in hop.stderr(), 20, "the relay to reconnect")
        assert pread_within(h, 4096, 0) == good[:4096]
    finally:
        h.shutdown()


@pytest.mark.parametrize("relay", ["true", "false"])
@pytest.mark.parametrize("fault", list(STATUS_FAULTS))
def test_relay_faults_a_bad_block_status_reply_costs_one_request(
    start_node, rogue, fault: str, relay: str
) -> None:
    up = rogue(status_fault=STATUS_FAULTS[fault])
    hop = start_node("nbd", f"relay={relay}", upstreams=[up.uri], env={"NBDFABRIC_LOG": "info"})
    h = nbd_connect(hop.uri)
    seen = Seen()
    try:
        h.block_status(4096, 0, seen)  # the upstream's context id, renumbered or not
        assert seen == [[4096, 0]]
        assert ("relayed to" in hop.stderr()) == (relay == "true"), hop.stderr()
        with pytest.raises(nbd.Error) as failed:
            h.block_status(4096, POISON, seen)
        assert failed.value.errnum == errno.EIO, failed.value
        assert up.poisoned == 1
        if relay == "true":
            assert "lost" in hop.stderr(), hop.stderr()

        def serves() -> bool:
            try:
                h.block_status(4096, 8192, seen)
                return True
            except nbd.Error:
                return False

        wait_for(serves, 20, "the hop to serve again")
        assert seen[-1] == [4096, 0]
    finally:
        h.shutdown()


def random_reply(rng: random.Random, cookie: int, offset: int, length: int) -> bytes:
    """A reply to a READ of zeros at `offset`: valid (one or more chunks that cover the range,
    in any order) or not, in one of the ways FAULTS names and mixtures of them. Every message
    is whole (its length field says what follows): an upstream that stops in the middle of
    one cannot be told from a slow one, by us or by libnbd."""
    pieces: list[tuple[int, int]] = []  # a valid split of the range into (start, length)
    at = offset
    while at < offset + length:
        n = min(rng.choice((512, 1024, 4096)), offset + length - at)
        pieces.append((at, n))
        at += n
    rng.shuffle(pieces)
    out = []
    for i, (start, n) in enumerate(pieces):
        kind = DATA if rng.random() < 0.5 else HOLE
        c = cookie if rng.random() > 0.05 else cookie + 1
        if rng.random() < 0.1:  # moved, or grown, outside the request
            start += rng.choice((-512, 512, length))
        if rng.random() < 0.05:
            n += 512
        if rng.random() < 0.05:
            kind = rng.choice((NONE, STATUS, 7, ERROR, ERROR_OFFSET))
        flags = DONE if i == len(pieces) - 1 or rng.random() < 0.05 else 0  # or ended early
        # (never left without DONE: a reply that never ends is a slow upstream's, not a fault)
        if kind == DATA:
            out.append(chunk(c, DATA, struct.pack(">Q", start) + bytes(n), flags))
        elif kind == HOLE:
            out.append(chunk(c, HOLE, struct.pack(">QI", start, n), flags))
        elif kind == ERROR:
            out.append(chunk(c, ERROR, struct.pack(">IH", rng.choice((0, 5, 22)), 0), flags))
        elif kind == ERROR_OFFSET:
            out.append(chunk(c, ERROR_OFFSET, struct.pack(">IHQ", 5, 0, start), flags))
        elif kind == STATUS:
            out.append(status(c, struct.pack(">II", n, 0), flags))
        else:
            out.append(chunk(c, kind, b"", flags))
        if flags & DONE:
            break
    if rng.random() < 0.05:
        out = [struct.pack(">IIQ", SIMPLE, rng.choice((0, 5)), cookie)]
    return b"".join(out)


@pytest.mark.parametrize("relay", ["true", "false"])
@pytest.mark.parametrize("seed", range(4))
def test_relay_faults_random_replies_never_reach_the_client_broken(
    start_node, rogue, seed: int, relay: str
) -> None:
    """Random replies to READs of zeros through the hop: each READ returns zeros or fails
    with an errno, and the client's connection stays usable (a message libnbd refuses,
    relayed, would have killed it), whatever the upstream sent."""
    rng = random.Random(seed)
    up = rogue(lambda c, o, n, d: random_reply(rng, c, o, n))
    hop = start_node("nbd", f"relay={relay}", upstreams=[up.uri], env={"NBDFABRIC_LOG": "info"})
    h = nbd_connect(hop.uri)
    # read between the READs of zeros: what a reused buffer holds where a reply left a gap
    other = b"\x5a" * 4096
    h.pwrite(other, 0)
    failed = 0  # (no try/finally: shutdown would wait for a READ left unanswered)
    for _ in range(ROUNDS):
        try:
            assert pread_within(h, 4096, POISON) == bytes(4096)
        except nbd.Error as exc:  # the hop's EIO, or the upstream's own errno passed on;
            # 0 would be the client's libnbd refusing what it was sent
            assert exc.errnum, exc
            failed += 1

        def serves() -> bool:
            try:
                return pread_within(h, 4096, 0) == other
            except nbd.Error as exc:
                assert exc.errnum == errno.EIO, exc
                return False

        wait_for(serves, 20, "the hop to serve again")
    assert ("relayed to" in hop.stderr()) == (relay == "true")
    assert 0 < failed < ROUNDS  # both kinds of reply were met
    h.shutdown()


@pytest.mark.parametrize("relay", ["true", "false"])
@pytest.mark.parametrize("fault", list(REQ_ONE_FAULTS))
def test_relay_faults_a_block_status_with_req_one_gets_one_extent(
    start_node, rogue, fault: str, relay: str
) -> None:
    """REQ_ONE asks for one extent, no longer than the request: the relay refuses a reply
    with more, or a longer one (EIO, the upstream dropped); the re-issuing hop answers from
    what it made of the reply, cut to one extent."""
    up = rogue(status_fault=REQ_ONE_FAULTS[fault])
    hop = start_node("nbd", f"relay={relay}", upstreams=[up.uri], env={"NBDFABRIC_LOG": "info"})
    h = nbd_connect(hop.uri)
    seen = Seen()
    try:
        h.block_status(4096, 0, seen, nbd.CMD_FLAG_REQ_ONE)
        assert seen == [[4096, 0]]
        if relay == "true":
            with pytest.raises(nbd.Error) as failed:
                h.block_status(4096, POISON, seen, nbd.CMD_FLAG_REQ_ONE)
            assert failed.value.errnum == errno.EIO, failed.value
            assert "lost" in hop.stderr(), hop.stderr()
        else:
            h.block_status(4096, POISON, seen, nbd.CMD_FLAG_REQ_ONE)
            assert len(seen[-1]) == 2 and 0 < seen[-1][0] <= 4096, seen
        assert up.poisoned == 1
    finally:
        h.shutdown()


@pytest.mark.parametrize("relay", ["true", "false"])
@pytest.mark.parametrize("reply", list(DF_REPLIES))
def test_relay_faults_a_read_with_df_gets_one_content_chunk(
    start_node, rogue, reply: str, relay: str
) -> None:
    """DF: at most one content chunk. The relay refuses a reply in pieces (EIO) and passes
    one hole chunk for the whole range; the re-issuing hop sends its client one chunk of
    what the upstream's pieces said."""
    fault, described = DF_REPLIES[reply]
    up = rogue(fault)
    hop = start_node("nbd", f"relay={relay}", upstreams=[up.uri], env={"NBDFABRIC_LOG": "info"})
    h = nbd_connect(hop.uri)
    try:
        assert h.can_df()
        good = bytes(range(256)) * 1024
        h.pwrite(good, 0)
        assert pread_df(h, 4096, 0) == (good[:4096], 1)
        expected = described(good[POISON : POISON + 4096])
        if relay == "true" and reply != "one hole chunk":
            with pytest.raises(nbd.Error) as failed:
                pread_df(h, 4096, POISON)
            assert failed.value.errnum == errno.EIO, failed.value
            assert "lost" in hop.stderr(), hop.stderr()
        else:
            assert pread_df(h, 4096, POISON) == (expected, 1)
        assert up.poisoned == 1
    finally:
        h.shutdown()


#: An offset window over the rogue upstream: the export is its bytes [WINDOW, 2 * WINDOW + ...)
#: and a request at POISON - WINDOW reaches POISON.
WINDOW = 32 * 1024

#: Valid replies to a READ at POISON whose offsets the relay must move back by WINDOW (the
#: client's libnbd refuses, and drops the connection for, an offset outside its request):
#: (fault, the bytes the client must get, or None for an error).
WINDOW_READS: dict[
    str, tuple[Callable[[int, int, int, bytes], bytes], Callable[[bytes], bytes | None]]
] = {
    "data, then the hole before it": (
        lambda c, o, n, d: (
            data(c, o + n // 2, d[n // 2 :], 0) + chunk(c, HOLE, struct.pack(">QI", o, n // 2))
        ),
        lambda d: bytes(len(d) // 2) + d[len(d) // 2 :],
    ),
    "an error at an offset": (
        lambda c, o, n, d: chunk(c, ERROR_OFFSET, struct.pack(">IHQ", 5, 0, o + 512)),
        lambda d: None,
    ),
}


@pytest.mark.parametrize("relay", ["true", "false"])
@pytest.mark.parametrize("reply", list(WINDOW_READS))
def test_relay_faults_through_a_window_the_offsets_in_replies_are_moved_back(
    start_node, rogue, reply: str, relay: str
) -> None:
    fault, described = WINDOW_READS[reply]
    up = rogue(fault)
    hop = start_node(
        "offset", f"offset={WINDOW}", f"relay={relay}", upstreams=[up.uri],
        env={"NBDFABRIC_LOG": "info"},
    )  # fmt: skip
    h = nbd_connect(hop.uri)
    try:
        good = bytes(range(256)) * 1024
        h.pwrite(good[WINDOW:], 0)
        assert pread_within(h, 4096, 0) == good[WINDOW : WINDOW + 4096]
        assert ("relayed to" in hop.stderr()) == (relay == "true"), hop.stderr()
        expected = described(good[POISON : POISON + 4096])
        if expected is None:
            with pytest.raises(nbd.Error) as failed:
                pread_within(h, 4096, POISON - WINDOW)
            assert failed.value.errnum == errno.EIO, failed.value
        else:
            assert pread_within(h, 4096, POISON - WINDOW) == expected
        assert up.poisoned == 1
        # the same connection goes on: nothing was refused, no upstream lost
        assert pread_within(h, 4096, 4096) == good[WINDOW + 4096 : WINDOW + 8192]
        assert "lost" not in hop.stderr(), hop.stderr()
    finally:
        h.shutdown()


#: Replies to a BLOCK_STATUS of the window's last 32K (POISON - WINDOW, the upstream's POISON):
#: (reply, what the relay makes of it, what the re-issuing hop does).
WINDOW_STATUS: dict[str, tuple[Callable[[int, int, int], bytes], list[int] | None, list[int]]] = {
    # the final extent may run past the request: not past the client's export
    "an extent past the window's end": (
        lambda c, o, n: status(c, struct.pack(">II", n + 64 * 1024, 1)),
        [32768, 1],
        [32768, 1],
    ),
    # only the final one may: the relay refuses, the re-issuing hop cuts
    "two extents, the first past the window's end": (
        lambda c, o, n: status(c, struct.pack(">IIII", n + 4096, 1, 4096, 0)),
        None,
        [32768, 1],
    ),
}


@pytest.mark.parametrize("relay", ["true", "false"])
@pytest.mark.parametrize("reply", list(WINDOW_STATUS))
def test_relay_faults_through_a_window_no_extent_reaches_past_the_export(
    start_node, rogue, reply: str, relay: str
) -> None:
    fault, relayed, reissued = WINDOW_STATUS[reply]
    up = rogue(status_fault=fault)
    hop = start_node(
        "offset", f"offset={WINDOW}", f"range={POISON + 32768 - WINDOW}", f"relay={relay}",
        upstreams=[up.uri], env={"NBDFABRIC_LOG": "info"},
    )  # fmt: skip
    h = nbd_connect(hop.uri)
    seen = Seen()
    try:
        assert h.get_size() == POISON + 32768 - WINDOW
        h.block_status(4096, 0, seen)
        assert seen == [[4096, 0]]
        assert ("relayed to" in hop.stderr()) == (relay == "true"), hop.stderr()
        expected = relayed if relay == "true" else reissued
        if expected is None:
            with pytest.raises(nbd.Error) as failed:
                h.block_status(32768, POISON - WINDOW, seen)
            assert failed.value.errnum == errno.EIO, failed.value
            assert "lost" in hop.stderr(), hop.stderr()
        else:
            h.block_status(32768, POISON - WINDOW, seen)
            assert seen[-1] == expected, seen
        assert up.poisoned == 1
    finally:
        h.shutdown()
