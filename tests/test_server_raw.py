"""Raw-socket abuse of one real node process: handshake edge cases, bad frames, huge and
overflowing requests, cut-off payloads, idle crowds and nbdkit's fuzz seeds. After every case a
well-formed client (libnbd or nbdinfo) must still be served by the same process.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import random
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, nbd_connect, rss_kib, run, wait_for

IHAVEOPT = 0x49484156454F5054
NBDMAGIC = 0x4E42444D41474943
REQUEST_MAGIC = 0x25609513
OPT_REPLY_MAGIC = 0x3E889045565A9
SIMPLE_MAGIC = 0x67446698
CHUNK_MAGIC = 0x668E33EF
SIZE = 1 << 20
EINVAL, ENOSPC, EPERM = 22, 28, 1
SEEDS = sorted(Path("/work/shared/corpus/nbdkit-fuzz-seeds").glob("*"))
OPT_GO, OPT_LIST, OPT_SR, OPT_SET_META = 7, 3, 8, 10
REP_ACK, REP_ERR_UNSUP = 1, (1 << 31) | 1


class Node:
    def __init__(self, proc: subprocess.Popen[bytes], sock: str, uri: str) -> None:
        self.proc, self.sock, self.uri = proc, sock, uri


@pytest.fixture(scope="module", params=[0, 100], ids=["plain", "polling"])
def node(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Node]:
    """One node for the whole module: every case below must leave it serving. Twice: as is, and
    polling before it sleeps (--poll-max-us), which reads the same sockets from another path."""
    tmp = tmp_path_factory.mktemp("raw")
    sock, ready = str(tmp / "n.sock"), tmp / "ready.json"
    log = (tmp / "n.log").open("wb")
    cmd = [sys.executable, "-m", "nodes.cli", "node", "memory", str(SIZE),
           "--listen", f"unix:{sock}", "--ready-file", str(ready),
           "--poll-max-us", str(request.param)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
    wait_for(ready.exists, 30, "raw node ready")
    uri = json.loads(ready.read_text())["uri"]
    yield Node(proc, sock, uri)
    proc.terminate()
    assert proc.wait(15) == 0


def assert_served(node: Node) -> None:
    """A well-formed client still gets correct service from the same process."""
    assert node.proc.poll() is None, "the node died"
    h = nbd_connect(node.uri)
    try:
        h.pwrite(b"ok" * 256, 4096)
        assert h.pread(512, 4096) == b"ok" * 256
        assert h.get_size() == SIZE
    finally:
        h.shutdown()


class Raw:
    """A hand-driven NBD client on a plain socket: a unix socket's path, or (host, port)."""

    def __init__(self, address: str | tuple[str, int], receive_buffer: int = 0) -> None:
        family = socket.AF_INET if isinstance(address, tuple) else socket.AF_UNIX
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if receive_buffer:  # before connecting: it sets the TCP window offered
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(20)
        self.sock.connect(address)
        self.ahead = bytearray()  #: bytes received already, read before the socket's

    def recv_exact(self, n: int) -> bytes:
        out = self.ahead[:n]
        del self.ahead[:n]
        while len(out) < n:
            piece = self.sock.recv(n - len(out))
            if not piece:
                raise ConnectionError(f"closed after {len(out)} of {n} bytes")
            out += piece
        return bytes(out)

    def greeting(self) -> int:
        magic, ihaveopt, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert (magic, ihaveopt) == (NBDMAGIC, IHAVEOPT)
        return int(flags)

    def option(self, option: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)

    def opt_reply(self) -> tuple[int, int, bytes]:
        magic, option, rep, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPT_REPLY_MAGIC
        return option, rep, self.recv_exact(length)

    def opt_replies(self) -> list[int]:
        """Reply types up to and including the final one."""
        reps = []
        while True:
            _, rep, _ = self.opt_reply()
            reps.append(rep)
            if rep == REP_ACK or rep & (1 << 31):
                return reps

    def handshake(self, structured: bool = True) -> None:
        self.greeting()
        self.sock.sendall(struct.pack(">I", 3))
        if structured:
            self.option(OPT_SR)
            assert self.opt_replies() == [REP_ACK]
            q = b"base:allocation"
            self.option(OPT_SET_META, struct.pack(">II", 0, 1) + struct.pack(">I", len(q)) + q)
            assert self.opt_replies()[-1] == REP_ACK
        self.option(OPT_GO, struct.pack(">IH", 0, 0))
        assert self.opt_replies()[-1] == REP_ACK

    def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                cookie: int = 1, payload: bytes = b"") -> None:  # fmt: skip
        header = struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length)
        self.sock.sendall(header + payload)

    def reply(self) -> tuple[int, int, bytes]:
        """(cookie, error, data) of one whole reply, simple or structured."""
        (magic,) = struct.unpack(">I", self.recv_exact(4))
        if magic == SIMPLE_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv_exact(12))
            return cookie, error, b""
        assert magic == CHUNK_MAGIC, hex(magic)
        error, data = 0, bytearray()
        while True:
            flags, kind, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
            body = self.recv_exact(length)
            if kind & (1 << 15):
                error = struct.unpack(">I", body[:4])[0]
            elif kind == 1:
                data += body[8:]
            if flags & 1:
                return cookie, error, bytes(data)
            assert struct.unpack(">I", self.recv_exact(4))[0] == CHUNK_MAGIC

    def chunks(self) -> list[tuple[int, int, int, bytes]]:
        """(flags, type, cookie, payload) of each chunk of one structured reply, DONE last."""
        out = []
        while True:
            magic, flags, kind, cookie, length = struct.unpack(">IHHQI", self.recv_exact(20))
            assert magic == CHUNK_MAGIC, f"a structured reply was due, got magic {magic:#x}"
            out.append((flags, kind, cookie, self.recv_exact(length)))
            if flags & 1:
                return out

    def is_closed(self) -> bool:
        """True once the server has dropped us (EOF or reset)."""
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def unread(self) -> int:
        """Bytes sent that the peer has not read from the socket yet (TIOCOUTQ; on a unix
        socket: not yet taken by the node)."""
        (n,) = struct.unpack("i", fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))
        return int(n)

    def replies_waiting(self) -> int:
        """How many whole replies the node has sent that wait unread. The socket's bytes
        (FIONREAD) move to `ahead`, still to be read; counted as replies without a simple
        reply's data (every reply but a READ's when structured replies are off)."""
        (n,) = struct.unpack("i", fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, b"\0" * 4))
        while n > 0:
            piece = self.sock.recv(n)
            self.ahead += piece
            n -= len(piece)
        count, at = 0, 0
        while at + 4 <= len(self.ahead):
            (magic,) = struct.unpack_from(">I", self.ahead, at)
            if magic == SIMPLE_MAGIC:
                at += 16
                count += at <= len(self.ahead)
                continue
            if at + 20 > len(self.ahead):
                break
            flags, _, _, length = struct.unpack_from(">HHQI", self.ahead, at + 4)
            at += 20 + length
            count += flags & 1 and at <= len(self.ahead)
        return count

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(node: Node) -> Iterator[Raw]:
    r = Raw(node.sock)
    yield r
    r.close()
    assert_served(node)


# Handshake -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "client_bytes",
    [
        pytest.param(b"", id="close-after-greeting"),
        pytest.param(struct.pack(">I", 4), id="unknown-client-flag"),
        pytest.param(struct.pack(">I", 0xFFFFFFFF), id="all-client-flags"),
        pytest.param(struct.pack(">I", 3) + b"NOTMAGIC" + bytes(8), id="bad-option-magic"),
        pytest.param(struct.pack(">IQII", 3, IHAVEOPT, 99, 0xFFFFFFFF), id="option-4GiB"),
        pytest.param(struct.pack(">IQII", 3, IHAVEOPT, 1, 5000) + b"x" * 5000, id="long-name"),
        pytest.param(struct.pack(">IQII", 3, IHAVEOPT, 1, 4) + b"\xff\xfe\0a", id="bad-utf8"),
        pytest.param(
            struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, 3, 0) * 40, id="too-many-options"
        ),
    ],
)
def test_raw_handshake_abuse_disconnects(raw: Raw, client_bytes: bytes) -> None:
    raw.greeting()
    raw.sock.sendall(client_bytes)
    if not client_bytes:
        raw.sock.shutdown(socket.SHUT_WR)
    assert raw.is_closed()


def test_raw_handshake_unknown_option_then_go(raw: Raw) -> None:
    assert raw.greeting() & 1, "FIXED_NEWSTYLE must be offered"
    raw.sock.sendall(struct.pack(">I", 1))
    raw.option(0x7FFF, b"some data the server must skip")
    assert raw.opt_replies() == [REP_ERR_UNSUP]
    raw.option(OPT_LIST, b"junk")
    assert raw.opt_replies() == [(1 << 31) | 3]
    raw.option(OPT_GO, struct.pack(">IH", 0, 0))
    assert raw.opt_replies()[-1] == REP_ACK
    raw.request(0, 0, 512, cookie=42)  # simple replies: no SR was negotiated
    (magic, error, cookie) = struct.unpack(">IIQ", raw.recv_exact(16))
    assert (magic, error, cookie) == (SIMPLE_MAGIC, 0, 42)
    raw.recv_exact(512)


def test_raw_handshake_export_name_without_zeroes(raw: Raw) -> None:
    raw.greeting()
    raw.sock.sendall(struct.pack(">I", 1))  # fixed, but no NO_ZEROES: expect 124 zero bytes
    raw.option(1, b"")
    size, tflags = struct.unpack(">QH", raw.recv_exact(10))
    assert size == SIZE and tflags & 1
    assert raw.recv_exact(124) == bytes(124)
    raw.request(3)  # FLUSH
    assert raw.reply()[1] == 0


def test_raw_abort_with_data_is_acked(raw: Raw) -> None:
    # Spec, NBD_OPT_ABORT: the server MUST reply with NBD_REP_ACK, and SHOULD ignore data the
    # client sent with it rather than reject the request as invalid.
    raw.greeting()
    raw.sock.sendall(struct.pack(">I", 3))
    raw.option(2, b"data the server should ignore")
    assert raw.opt_reply() == (2, REP_ACK, b"")
    assert raw.is_closed()


# Transmission --------------------------------------------------------------------------------


def test_raw_bad_request_magic_disconnects(raw: Raw) -> None:
    raw.handshake()
    raw.sock.sendall(struct.pack(">IHHQQI", 0x12560953, 0, 0, 1, 0, 512))
    assert raw.is_closed()


def test_raw_rejected_write_payload_is_consumed(raw: Raw) -> None:
    raw.handshake()
    # Past the end (ENOSPC), a bad flag (EINVAL), overflowing offset: payload still follows.
    cases = [(SIZE - 100, 0, ENOSPC), (0, 1 << 7, EINVAL), (2**64 - 512, 0, ENOSPC)]
    for cookie, (offset, flags, expected) in enumerate(cases, 1):
        raw.request(1, offset, 1024, flags, cookie, payload=b"\x52" * 1024)
        assert raw.reply() == (cookie, expected, b"")
    raw.request(0, SIZE - 100, 100, cookie=9)
    assert raw.reply() == (9, 0, bytes(100)), "the rejected payloads must not have been written"


def test_raw_write_payload_that_looks_like_requests(raw: Raw) -> None:
    raw.handshake()
    fake = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 2, 66, 0, 0) * 8  # eight DISCs as data
    raw.request(1, 8192, len(fake), cookie=5, payload=fake)
    assert raw.reply() == (5, 0, b"")
    raw.request(0, 8192, len(fake), cookie=6)
    assert raw.reply() == (6, 0, fake)


@pytest.mark.parametrize(
    ("offset", "length", "sent"),
    [
        # (In the disk's top half: the other tests here lay out their data below it.)
        pytest.param(768 << 10, 4096, 1000, id="4K"),
        # Received straight into pages (a landing), aligned to them and not: none is applied.
        pytest.param(640 << 10, 256 << 10, 150_000, id="256K-landing"),
        pytest.param(700_000, 256 << 10, 200_000, id="256K-landing-unaligned"),
    ],
)
def test_raw_write_cut_off_mid_payload(
    raw: Raw, node: Node, offset: int, length: int, sent: int
) -> None:
    h = nbd_connect(node.uri)
    before = bytes([0x5A]) * (length + 8192)
    h.pwrite(before, offset - 4096)
    raw.handshake()
    raw.request(1, offset, length, cookie=1, payload=b"\xee" * sent)
    raw.sock.shutdown(socket.SHUT_WR)
    assert raw.is_closed()
    assert h.pread(len(before), offset - 4096) == before, "a partial write must not be applied"
    h.shutdown()


@pytest.mark.parametrize(
    ("cmd", "offset", "length", "flags", "expected"),
    [
        pytest.param(0, 0, 0xFFFFFFFF, 0, EINVAL, id="read-4GiB"),
        pytest.param(0, 0, 64 << 20, 0, EINVAL, id="read-64MiB"),
        pytest.param(4, 0, 0xFFFFFFFF, 0, EINVAL, id="trim-4GiB"),
        pytest.param(6, 0, 0xFFFFFFFF, 0, ENOSPC, id="zero-4GiB"),
        pytest.param(7, 0, 0xFFFFFFFF, 0, EINVAL, id="status-4GiB"),
        pytest.param(0, 2**64 - 1, 2, 0, EINVAL, id="read-offset-overflow"),
        pytest.param(6, 2**64 - 4096, 8192, 0, ENOSPC, id="zero-offset-overflow"),
        pytest.param(4, 2**63, 1, 0, EINVAL, id="trim-offset-2^63"),
        pytest.param(8, 0, 0, 0, EINVAL, id="cmd-8"),
        pytest.param(0xFFFF, 0, 512, 0, EINVAL, id="cmd-65535"),
        pytest.param(0, 0, 512, 1 << 5, EINVAL, id="unknown-flag"),
        pytest.param(0, 0, 512, 1 << 15, EINVAL, id="top-flag"),
        pytest.param(0, 0, 512, 2, EINVAL, id="no-hole-on-read"),
        pytest.param(3, 0, 512, 0, EINVAL, id="flush-with-length"),
        pytest.param(7, 0, 0, 0, EINVAL, id="status-zero-length"),
        pytest.param(0, SIZE, 0, 0, 0, id="read-zero-at-end"),
    ],
)
def test_raw_bad_requests_get_errors(
    raw: Raw, cmd: int, offset: int, length: int, flags: int, expected: int
) -> None:
    raw.handshake()
    raw.request(cmd, offset, length, flags, cookie=0xDEADBEEF)
    assert raw.reply()[:2] == (0xDEADBEEF, expected)
    raw.request(0, 0, 16, cookie=2)
    assert raw.reply()[:2] == (2, 0), "the connection must stay usable after an error"


@pytest.mark.parametrize(
    ("offset", "length", "flags", "expected"),
    [
        pytest.param(0, 512, 1 << 1, EINVAL, id="bad-flag"),
        pytest.param(SIZE - 256, 512, 0, EINVAL, id="past-end"),
        pytest.param(0, 64 << 20, 0, EINVAL, id="over-max-payload"),
        pytest.param(0, 0, 0, 0, id="zero-length"),
    ],
)
def test_raw_structured_read_replies_are_never_simple(
    raw: Raw, offset: int, length: int, flags: int, expected: int
) -> None:
    # Spec, Structured reply chunk message: with structured replies negotiated the server MUST
    # NOT use a simple reply for NBD_CMD_READ, "even for the case of an early NBD_EINVAL due to
    # bad flags". An error is one error chunk (bit 15, nonzero error, message within the
    # chunk) marked DONE; an empty read is a NONE chunk (OFFSET_DATA needs 9 bytes or more).
    raw.handshake()
    raw.request(0, offset, length, flags, cookie=77)
    [(done, kind, cookie, payload)] = raw.chunks()
    assert (done, cookie) == (1, 77)
    if expected:
        error, mlen = struct.unpack_from(">IH", payload)
        assert kind == (1 << 15) + 1 and error == expected and len(payload) == 6 + mlen
        payload[6:].decode()
    else:
        assert (kind, payload) == (0, b"")


def test_raw_fua_is_accepted_on_every_command(raw: Raw) -> None:
    # Spec, NBD_CMD_FLAG_FUA: valid for all commands once NBD_FLAG_SEND_FUA is advertised, "in
    # which case the server MUST accept all commands with this bit set (even by ignoring it)".
    raw.handshake()
    fua = 1
    raw.request(1, 8192, 512, fua, cookie=1, payload=b"f" * 512)
    assert raw.reply() == (1, 0, b"")
    for cookie, (cmd, length) in enumerate([(3, 0), (4, 512), (5, 4096), (6, 512)], 2):
        raw.request(cmd, 0 if cmd == 3 else 16384, length, fua, cookie=cookie)
        assert raw.reply()[:2] == (cookie, 0), f"command {cmd} with FUA"
    raw.request(0, 8192, 512, fua, cookie=9)
    assert raw.reply() == (9, 0, b"f" * 512)
    raw.request(7, 0, 4096, fua, cookie=10)
    assert raw.reply()[:2] == (10, 0)


def test_raw_block_status_is_one_chunk_per_selected_context(raw: Raw) -> None:
    # Spec, NBD_CMD_BLOCK_STATUS: a successful reply is exactly one NBD_REPLY_TYPE_BLOCK_STATUS
    # chunk per selected context, carrying the id NBD_OPT_SET_META_CONTEXT gave it, with one
    # or more nonzero descriptors; all but the last end before the requested length; with
    # REQ_ONE exactly one descriptor, no longer than the request.
    raw.greeting()
    raw.sock.sendall(struct.pack(">I", 3))
    raw.option(OPT_SR)
    assert raw.opt_replies() == [REP_ACK]
    q = b"base:allocation"
    raw.option(OPT_SET_META, struct.pack(">II", 0, 1) + struct.pack(">I", len(q)) + q)
    _, rep, data = raw.opt_reply()
    assert rep == 4 and data[4:] == q
    (context,) = struct.unpack(">I", data[:4])
    assert raw.opt_replies() == [REP_ACK]
    raw.option(OPT_GO, struct.pack(">IH", 0, 0))
    assert raw.opt_replies()[-1] == REP_ACK
    for cookie, offset in enumerate((4096, 65536), 1):  # data amid holes (32K pages)
        raw.request(1, offset, 4096, cookie=cookie, payload=b"d" * 4096)
        assert raw.reply() == (cookie, 0, b"")
    for flags, length in ((0, 131072), (0, 40960), (8, 131072), (8, 1000)):
        raw.request(7, 0, length, flags, cookie=50)
        [(done, kind, cookie, payload)] = raw.chunks()
        assert (done, kind, cookie) == (1, 5, 50)
        assert len(payload) >= 12 and (len(payload) - 4) % 8 == 0
        assert struct.unpack_from(">I", payload)[0] == context
        lengths = [n for n, _ in struct.iter_unpack(">II", payload[4:])]
        assert all(lengths)
        assert sum(lengths[:-1]) < length
        if flags:
            assert len(lengths) == 1 and lengths[0] <= length
        else:
            assert len(lengths) > 1


def test_raw_huge_rejected_write_disconnects(raw: Raw) -> None:
    raw.handshake()
    raw.request(1, 0, 0xFFFFFFFF, cookie=3, payload=b"x" * 4096)
    # Skipping 4 GiB to stay in step is not worth it: the server hangs up instead of waiting.
    assert raw.is_closed()


def test_raw_many_idle_connections(node: Node) -> None:
    idle: list[Raw] = []
    try:
        for i in range(120):
            r = Raw(node.sock)
            if i % 3 == 1:
                r.greeting()
                r.sock.sendall(struct.pack(">I", 3))  # parked in option haggling
            elif i % 3 == 2:
                r.handshake()  # parked in transmission
            idle.append(r)
        assert_served(node)
        run(["nbdinfo", node.uri], timeout=60)
    finally:
        for r in idle:
            r.close()
    assert_served(node)


def test_raw_disc_finishes_outstanding_requests(raw: Raw) -> None:
    raw.handshake()
    for cookie in range(1, 9):
        raw.request(0, cookie * 4096, 4096, cookie=cookie)
    raw.request(2)
    cookies = sorted(raw.reply()[0] for _ in range(8))
    assert cookies == list(range(1, 9))
    assert raw.is_closed()


def test_raw_half_close_still_gets_its_replies(raw: Raw) -> None:
    """A client that sends its requests and then shuts down its sending side (no DISC) still
    gets every reply, one of them for a write whose payload came with the end of the stream."""
    raw.handshake()
    raw.request(1, 0, 65536, cookie=100, payload=b"\xab" * 65536)
    for cookie in range(1, 65):
        raw.request(0, (cookie % 16) * 4096, 4096, cookie=cookie)
    raw.sock.shutdown(socket.SHUT_WR)
    replies = {cookie: (error, data) for cookie, error, data in (raw.reply() for _ in range(65))}
    assert sorted(replies) == [*range(1, 65), 100]
    assert all(error == 0 for error, _ in replies.values())
    assert all(data == b"\xab" * 4096 for c, (_, data) in replies.items() if c != 100)
    assert raw.is_closed()


def test_raw_replies_beyond_the_socket_buffer_arrive_whole(raw: Raw) -> None:
    """A client that sends a burst and only then reads: the replies (small ones gathered per
    read, big ones alone) overflow the socket buffer, wait for room, and arrive whole."""
    raw.handshake()
    pattern = bytes(range(256)) * 128  # 32 KiB
    raw.request(1, 0, len(pattern), cookie=1000, payload=pattern)
    assert raw.reply() == (1000, 0, b"")
    expected: dict[int, bytes] = {}
    for cookie in range(1, 301):
        if cookie % 3:
            raw.request(0, 0, 32768, cookie=cookie)
            expected[cookie] = pattern
        else:
            raw.request(1, 65536 + cookie * 16, 16, cookie=cookie, payload=b"w" * 16)
            expected[cookie] = b""
    time.sleep(0.5)  # let the node fill the socket before reading anything
    got = {cookie: (error, data) for cookie, error, data in (raw.reply() for _ in expected)}
    assert {c: e for c, (e, _) in got.items()} == dict.fromkeys(expected, 0)
    assert {c: d for c, (_, d) in got.items()} == expected


def test_raw_a_256k_reply_fits_in_the_unix_socket_at_once(raw: Raw) -> None:
    """The node widens its unix sockets' send buffers so a big reply goes out in one piece,
    not in wake-ups for room (nodes/server/stream.py UNIX_SNDBUF): a 256 KiB read's reply is
    in the client's socket whole before the client reads a byte. With the kernel's default
    (208 KiB, net.core.wmem_default) at most that much could be queued."""
    raw.handshake(structured=False)
    length = 256 * 1024
    raw.request(0, 0, length, cookie=7)
    whole = 16 + length  # a simple reply and its data
    queued, deadline = 0, time.monotonic() + 10
    while queued < whole and time.monotonic() < deadline:
        time.sleep(0.05)
        queued = struct.unpack("i", fcntl.ioctl(raw.sock, termios.FIONREAD, b"\0" * 4))[0]
    assert queued == whole, f"{queued} of the reply's {whole} bytes queued"
    assert raw.reply() == (7, 0, b"")
    assert len(raw.recv_exact(length)) == length


@pytest.mark.parametrize(
    "length, count", [(SIZE, 20000), (1, 400000)], ids=["1MiB-reads", "1-byte-reads"]
)
def test_raw_a_client_that_never_reads_cannot_swell_the_node(
    node: Node, length: int, count: int
) -> None:
    """28 bytes of request ask for 1 MiB of reply: a client that pipelines thousands of big
    reads and never reads a byte must not make the node hold gigabytes of replies (reading
    stops at the per-connection byte budget), nor keep other clients from being served.
    (Before the budget counted corked replies the socket had not taken, 20,000 such requests
    grew the node by 220 MiB.) Nor may tiny replies: a 1-byte read's reply is 29 bytes, held
    in a header and a view of the page, some 400 bytes of objects; counted by their bytes
    alone, 300,000 of them grew the node by 113 MiB."""
    hog = Raw(node.sock)
    try:
        hog.handshake()
        hog.request(1, 0, SIZE, cookie=1, payload=random.randbytes(SIZE))
        assert hog.reply()[:2] == (1, 0)
        before = rss_kib(node.proc.pid) / 1024
        burst = b"".join(
            struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 0, cookie, 0, length)
            for cookie in range(2, count + 2)
        )
        hog.sock.setblocking(False)
        sent, deadline = 0, time.monotonic() + 3
        while sent < len(burst) and time.monotonic() < deadline:
            try:
                sent += hog.sock.send(burst[sent:])
            except BlockingIOError:
                time.sleep(0.05)
        # Until the node has taken in all it is going to (its RSS stops moving).
        now, last, settle = rss_kib(node.proc.pid) / 1024, -1.0, time.monotonic() + 10
        while now != last and time.monotonic() < settle:
            time.sleep(0.5)
            now, last = rss_kib(node.proc.pid) / 1024, now
        grown = now - before
        assert grown < 48, f"the node's RSS grew by {grown:.0f} MiB for {sent // 28} requests"
        assert_served(node)
    finally:
        hog.close()
    assert_served(node)


@pytest.mark.parametrize("ordering", ["unordered", "ordered"])
def test_raw_replies_queued_behind_a_full_socket_arrive_whole_and_in_turn(
    start_node: Callable[..., Any], ordering: str
) -> None:
    """A client that pipelines 40 MiB of reads of odd sizes and reads the replies slowly makes
    the node queue most of them while its socket is full, and send each queued batch in pieces
    the socket cuts anywhere. Every reply must still arrive whole, with its own bytes, and in
    ordered mode in the order asked."""
    extra = ("--ordering", ordering) if ordering == "ordered" else ()
    node = start_node("memory", str(SIZE), extra=extra)
    disk = random.Random(7).randbytes(SIZE)
    h = nbd_connect(node.uri)
    h.pwrite(disk, 0)
    h.shutdown()
    rng = random.Random(ordering)
    asked = []
    for cookie in range(80):
        length = rng.choice([1, 4095, 65537, 262143, SIZE - 3, rng.randrange(1, SIZE)])
        asked.append((cookie, rng.randrange(0, SIZE - length + 1), length))
    client = Raw(node.socket)
    try:
        client.handshake()
        client.sock.sendall(
            b"".join(
                struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 0, cookie, offset, length)
                for cookie, offset, length in asked
            )
        )
        time.sleep(0.5)  # the node fills its socket and queues the rest
        got = []
        for i in range(len(asked)):
            if i % 10 == 0:
                time.sleep(0.05)  # and again, while the queue empties
            got.append(client.reply())
    finally:
        client.close()
    if ordering == "ordered":
        assert [cookie for cookie, _, _ in got] == list(range(len(asked)))
    by_cookie = {cookie: (error, data) for cookie, error, data in got}
    assert sorted(by_cookie) == list(range(len(asked)))
    for cookie, offset, length in asked:
        error, data = by_cookie[cookie]
        assert error == 0 and data == disk[offset : offset + length], f"request {cookie}"
    assert node.proc.poll() is None


def test_raw_a_reply_never_cuts_into_one_the_socket_took_in_part(
    start_node: Callable[..., Any],
) -> None:
    """A reply the socket took only part of waits for room; one made meanwhile must wait behind
    it, even when the socket has room by the time it is made (else its bytes land inside the
    first reply's data). The node is stopped while the client makes room and asks again, so
    that its loop sees both at once: it reads and answers the new request before the waiting
    reply's sender runs. The reply is far larger than the socket's buffer (made small here)
    and what waits of it is less than the connection's byte budget (MAX_BYTES_IN_FLIGHT), so
    that the node goes on reading requests."""
    size = 4 << 20
    node = start_node("memory", str(size), env={"NBDFABRIC_UNIX_SNDBUF": str(64 << 10)})
    disk = random.Random(11).randbytes(size)
    h = nbd_connect(node.uri)
    h.pwrite(disk, 0)
    h.shutdown()
    client = Raw(node.socket)
    try:
        client.handshake()
        client.request(0, 0, size, cookie=1)
        time.sleep(0.5)  # the node fills its socket and keeps the rest of the reply back
        node.proc.send_signal(signal.SIGSTOP)
        try:
            client.sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while piece := client.sock.recv(1 << 20):  # all the socket holds: room
                    client.ahead += piece
            client.sock.settimeout(20)
            client.request(0, 4096, 4096, cookie=2)
            time.sleep(0.1)
        finally:
            node.proc.send_signal(signal.SIGCONT)
        assert 0 < len(client.ahead) < size, "the first reply was not cut by the socket"
        first, second = client.reply(), client.reply()
    finally:
        client.close()
    assert first[:2] == (1, 0) and first[2] == disk, "the first reply came back altered"
    assert second == (2, 0, disk[4096:8192])
    assert node.proc.poll() is None


# One client's burst must not starve the others ------------------------------------------------


def tcp_address(uri: str) -> tuple[str, int]:
    host, port = uri.split("//")[1].split("/")[0].rsplit(":", 1)
    return host, int(port)


def negotiated(address: str | tuple[str, int], limit: float) -> Raw:
    """A second client, connected and negotiated while the node is idle (`limit`: seconds it
    may wait for each reply)."""
    other = Raw(address)
    other.sock.settimeout(limit)
    other.handshake()
    return other


def burst(
    cmd: int, length: int, count: int, offset: int = 0, payload: bytes = b"", flags: int = 0
) -> bytes:
    """`count` requests to send at once, request i at offset * i and with cookie i."""
    return b"".join(
        struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, i, offset * i, length) + payload
        for i in range(count)
    )


def pipelined(
    hog: Raw,
    cmd: int,
    length: int,
    count: int,
    offset: int = 0,
    payload: bytes = b"",
    flags: int = 0,
) -> tuple[threading.Thread, list[int]]:
    """Send a burst of `count` requests; a thread reads their replies and lists their
    errors, so `len(errors)` is how many were answered so far."""
    errors: list[int] = []

    def read_replies() -> None:
        for _ in range(count):
            errors.append(hog.reply()[1])

    reader = threading.Thread(target=read_replies, daemon=True)
    reader.start()
    hog.sock.sendall(burst(cmd, length, count, offset, payload, flags))
    return reader, errors


def answered_while_another_client_waits(other: Raw, errors: list[int]) -> int:
    """How many of the hog's pipelined requests were answered while `other`, already
    negotiated, sent a 4K READ and waited for its reply: one round trip, counted in the hog's
    replies, not in time (a loaded machine slows both alike)."""
    deadline = time.monotonic() + 60
    while not errors and time.monotonic() < deadline:  # the node is at work on the burst
        time.sleep(0.001)
    before = len(errors)
    other.request(0, 4096, 4096, cookie=1)
    assert other.reply()[:2] == (1, 0)
    return len(errors) - before


def test_raw_a_burst_of_costly_commands_does_not_stall_other_clients(start_node) -> None:
    """A WRITE_ZEROES (NO_HOLE) of 4 GiB is 28 bytes to send and, over a memory disk with
    6,000 written pages, some 10-50 ms of work done inline (each page written over). Requests
    that run inline ran back to back in the feed that read them: a burst of them kept the event
    loop, and so every other client, waiting until all were done (on a cow node, 60 TRIMs of
    4 GiB kept it 4 s). Now a connection whose inline commands have taken MAX_INLINE_WORK stops
    reading for a turn of the loop: a second client is served while most of the burst waits.
    (The replies are 16 bytes: a command with big replies is held back by its client's reading.)
    """
    node = start_node("memory", "1T")
    writer = Raw(node.socket)
    writer.handshake()
    reader, errors = pipelined(writer, 1, 1, 6000, offset=2 * 32768, payload=b"x")  # WRITE
    reader.join(120)
    writer.close()
    assert errors == [0] * 6000, "every page was written"
    hog = Raw(node.socket)
    hog.handshake()
    hog.sock.settimeout(120)
    other = negotiated(node.socket, 60)
    count = 60
    no_hole = 2
    hog.sock.sendall(burst(6, (4 << 30) - (64 << 10), count, flags=no_hole))  # WRITE_ZEROES
    wait_for(lambda: hog.unread() == 0, 60, "the node to read the burst", interval=0.001)
    other.request(0, 4096, 4096, cookie=1)
    assert other.reply()[:2] == (1, 0)
    # The replies are 16 bytes and left unread until now, so the socket holds every one the
    # node sent before it answered the other client (and a few since, on a loaded machine).
    answered = hog.replies_waiting()
    errors = [hog.reply()[1] for _ in range(count)]
    hog.close()
    other.close()
    assert errors == [0] * count, "every WRITE_ZEROES got its reply"
    assert answered < count // 2, f"{answered} of {count} were answered while another client waited"


def test_raw_a_deep_pipeline_on_tcp_does_not_stall_other_clients(start_node) -> None:
    """A TCP socket holds megabytes of requests, and the event loop reads a full socket up to 32
    times in one go: a client that pipelined 30,000 READs of 32 MiB of holes (each some 0.15 ms
    of work, its reply a 32-byte hole chunk) had them all served before any other client, about
    4 s here (200,000: half a minute). Now one feed dispatches at most MAX_FEED requests before
    the loop runs the others."""
    node = start_node("memory", "1G", listen="127.0.0.1:0")
    address = tcp_address(node.uri)
    hog = Raw(address)
    hog.handshake()
    other = negotiated(address, 60)
    count = 30000
    reader, errors = pipelined(hog, 0, 32 << 20, count)  # READ
    answered = answered_while_another_client_waits(other, errors)
    reader.join(120)
    hog.close()
    other.close()
    assert errors == [0] * count, "every READ got its reply"
    assert answered < count // 2, f"{answered} of {count} were answered while another client waited"


def test_raw_emulated_cache_counts_its_scratch_buffer_against_the_byte_budget(start_node) -> None:
    """Where CACHE is emulated, each request reads its range through a 1 MiB scratch buffer: 28
    bytes that make the node hold a MiB for as long as the read takes. Up to MAX_IN_FLIGHT of
    them per connection held 64 MiB (200 pipelined CACHEs of 64 MiB: +64 MiB at the peak); the
    buffer now counts against the connection's byte budget, as a READ's reply does."""
    disk = start_node("memory", "1G")
    node = start_node("nocache", "cachemode=emulate", upstreams=[disk.uri])
    hog = Raw(node.socket)
    hog.handshake()
    before = rss_kib(node.pid) / 1024
    reader, errors = pipelined(hog, 5, 64 << 20, 200)  # CACHE
    peak = before
    while reader.is_alive():
        peak = max(peak, rss_kib(node.pid) / 1024)
        reader.join(0.02)
    hog.close()
    assert errors == [0] * 200
    assert peak - before < 32, f"the node's RSS grew by {peak - before:.0f} MiB"


# nbdkit's fuzz seeds -------------------------------------------------------------------------


def replay(node: Node, data: bytes) -> None:
    r = Raw(node.sock)
    try:
        r.sock.sendall(data)
        r.sock.shutdown(socket.SHUT_WR)
        assert r.is_closed(), "the server must end a session whose client has finished"
    except (BrokenPipeError, ConnectionResetError):
        pass  # dropped before it read everything: allowed for garbage
    finally:
        r.close()


def mutations(data: bytes, rng: random.Random) -> Iterator[bytes]:
    yield data
    for cut in sorted({1, 4, 20, len(data) // 2, len(data) - 1}):
        if 0 < cut < len(data):
            yield data[:cut]
    for _ in range(10):
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(flipped))
            flipped[i] ^= 1 << rng.randrange(8)
        yield bytes(flipped)


@pytest.mark.parametrize("seed", SEEDS, ids=[p.name for p in SEEDS])
def test_raw_fuzz_seed_replay(node: Node, seed: Path) -> None:
    rng = random.Random(seed.name)
    for data in mutations(seed.read_bytes(), rng):
        replay(node, data)
    assert_served(node)


def test_raw_fuzz_seeds_exist() -> None:
    assert len(SEEDS) >= 5


@pytest.mark.parametrize("limit", ["1", "0"])
def test_raw_handshake_limit(start_node, limit: str) -> None:
    """--handshake-limit (qemu-nbd's, default 10 s): a client that never finishes negotiating
    is dropped after it, so it cannot hold a connection (and a --max-connections slot) forever;
    one in transmission is never dropped for being idle. 0: no limit."""
    node = start_node("memory", "1M", extra=("--handshake-limit", limit))
    silent, haggling, serving = Raw(node.socket), Raw(node.socket), Raw(node.socket)
    haggling.greeting()
    haggling.sock.sendall(struct.pack(">I", 3))
    haggling.option(OPT_LIST)
    assert haggling.opt_replies()
    serving.handshake()
    time.sleep(3)  # three times the limit of 1 s
    for r in (silent, haggling, serving):
        r.sock.settimeout(2)
    if limit == "1":
        assert silent.is_closed() and haggling.is_closed()
    else:
        assert not silent.is_closed() and not haggling.is_closed()
    assert not serving.is_closed()
    serving.request(0, 0, 4096)  # READ
    assert serving.reply()[:2] == (1, 0)  # cookie 1, no error (the data: a hole)
    for r in (silent, haggling, serving):
        r.close()
