"""A bounded adversarial-client fuzz run against live nodes of many shapes (plugins, filters,
fans), over raw sockets: every parsable reply is checked against the spec and against a model
of the export, and after every batch a well-behaved libnbd client must still be served and read
back exactly what the model says the export holds.

Bounded and reproducible: `NBDFABRIC_FUZZ_SECONDS` per node shape (default 4 for the first
eleven shapes, 1 for the others, so the whole file stays within about 4 minutes),
`NBDFABRIC_FUZZ_SEED` to replay a run (the seed is printed; a failure shows it). The client
sequences follow from the seed; the interleaving of concurrent clients follows the scheduler.
A node that stops answering fails the run within about REPLY_TIMEOUT, naming the shape and the
seed, wherever the harness waits for it (raw clients, its metrics, libnbd).

The connection shapes (CONNECTION_SHAPES) are judged on what their filter does with clients too:
a limit node never serves more than its limit side by side and its refusals are the allowed
outcome, noparallel's connections mode serves one client at a time, the filters' own counts of
clients are back to nothing between batches, exitlast and exitwhen exit by themselves (status
0) once told after the run, and multi-conn over a writeback cache skips no flush that is owed.
The pause shape is paused and resumed through its control socket at random while each batch
runs: every `p` and `r` must be answered, and held requests answered as any others.

The tls-* shapes serve their clients over TLS (STARTTLS, then a TLS handshake the client drives
itself, so it can also get it wrong: options before TLS, STARTTLS twice or with data, plaintext
injected behind STARTTLS, garbage or a cut ClientHello, a handshake that never ends, a corrupt
record, close_notify while replies are on their way); libnbd reads them back over TLS too.
tls-fallback (the filter run with --tls=on over a memory node) serves its TLS clients the disk,
judged as tls-on's, and a session that stays plaintext a stand-in (Target.plaintext), as
nbdkit 1.32 does: whatever name it asks for, the tlsreadme= notice padded with NULs to 512
bytes, read-only with nothing else advertised, listed as the one export "", told by its own
name and with no description. Its writes get EPERM, and none of them (nor a replayed seed's)
may show in the disk libnbd reads back over TLS after each batch.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import itertools
import json
import os
import random
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import Proc, make_certificates, rss_kib
from test_filters_policy import Control

from bench import ssh_server
from bench.http_server import HttpServer

pytestmark = pytest.mark.slow

FUZZ_SECONDS = float(os.environ.get("NBDFABRIC_FUZZ_SECONDS") or 4)
#: The shapes added later (plugins, most filters and fans) get less time each by default.
FUZZ_SECONDS_MORE = float(os.environ.get("NBDFABRIC_FUZZ_SECONDS") or 1)
SEED = int(os.environ.get("NBDFABRIC_FUZZ_SEED") or random.SystemRandom().randrange(1 << 32))
#: A reply, or the end of a connection the server should close, must come within this.
REPLY_TIMEOUT = 15.0
#: The TLS nodes' --handshake-limit: a client stuck in the (TLS) handshake is closed after
#: this, well within REPLY_TIMEOUT.
HANDSHAKE_LIMIT = 3.0

KiB, MiB = 1024, 1024 * 1024
SIZE = MiB

# Wire constants, spelled out here (not imported from nodes/): the test judges the node.
NBDMAGIC, IHAVEOPT = 0x4E42444D41474943, 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC, SIMPLE_MAGIC, CHUNK_MAGIC = 0x25609513, 0x67446698, 0x668E33EF
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_SR, OPT_LIST_META, OPT_SET_META = 8, 9, 10
#: The options that look the export up (a full limit node refuses them).
LOOKUPS = (OPT_INFO, OPT_GO, OPT_LIST_META, OPT_SET_META)
REP_ACK, REP_SERVER, REP_INFO, REP_META = 1, 2, 3, 4
REP_ERR = 1 << 31
ERR_UNSUP, ERR_INVALID, ERR_UNKNOWN = REP_ERR | 1, REP_ERR | 3, REP_ERR | 6
ERR_POLICY, ERR_TLS_REQD = REP_ERR | 2, REP_ERR | 5
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3
READ, WRITE, DISC, FLUSH, TRIM, CACHE, ZERO, BS = range(8)
CMD_NAMES = ["read", "write", "disc", "flush", "trim", "cache", "zero", "status"]
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16
VALID_FLAGS = {
    READ: FUA | DF,
    WRITE: FUA,
    FLUSH: FUA,
    TRIM: FUA,
    CACHE: FUA,
    ZERO: FUA | NO_HOLE | FAST_ZERO,
    BS: FUA | REQ_ONE,
}
T_HAS_FLAGS, T_READ_ONLY, T_FLUSH, T_FUA = 1, 2, 4, 8
T_TRIM, T_ZERO, T_DF, T_MULTI_CONN, T_CACHE, T_FAST_ZERO = 32, 64, 128, 256, 1024, 2048
ADVERTISED = {FLUSH: T_FLUSH, TRIM: T_TRIM, ZERO: T_ZERO, CACHE: T_CACHE}
EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP = 1, 5, 12, 22, 28, 75, 95
C_NONE, C_DATA, C_HOLE, C_STATUS, C_ERROR, C_ERROR_OFFSET = 0, 1, 2, 5, 32769, 32770
REQUEST = struct.Struct(">IHHQQI")
#: Bytes put in an upstream outside the window a view serves: they must never be read.
MARKER = b"\xa5OUTSIDE-WINDOW\x5a"
SEEDS = sorted(Path("/work/shared/corpus/nbdkit-fuzz-seeds").glob("*"))
BAD_LOG_LINES = ("Traceback", "Task exception was never retrieved", "Exception in callback")


class FuzzFailure(AssertionError):
    pass


def check(cond: object, message: str) -> None:
    if not cond:
        raise FuzzFailure(message)


# The model ------------------------------------------------------------------------------------


@dataclass(eq=False)
class Op:
    """One request in flight, as the model sees it."""

    cmd: int
    start: int
    end: int  #: clipped to the export
    mutates: bool  #: a write that may succeed: others overlapping it cannot be judged
    #: (start, end, is a trim) of writes in flight at some time during this one
    conflicts: list[tuple[int, int, bool]] = field(default_factory=list)


_NOT = bytes([1, 0]) + bytes(254)  #: bytes.translate table: 0 <-> 1


def swap_words(data: bytes, bits: int) -> bytes:
    """`data` with the bytes of each word of `bits` bits reversed (swab's model)."""
    w = bits // 8
    out = bytearray(len(data))
    for i in range(w):
        out[i::w] = data[w - 1 - i :: w]
    return bytes(out)


def differ(a: bytes, b: bytes, ignore: bytearray) -> int | None:
    """The first offset where `a` and `b` differ, outside the bytes `ignore` marks."""
    if a == b:
        return None
    for blk in range(0, len(a), 4096):
        if a[blk : blk + 4096] != b[blk : blk + 4096]:
            for i in range(blk, min(blk + 4096, len(a))):
                if a[i] != b[i] and not ignore[i]:
                    return i
    return None


class Model:
    """What the export holds: bytes and which of them are known. A write whose reply was never
    seen or writes racing each other make bytes unknown; unknown bytes are learnt back from a
    libnbd read at the end of each batch. Trimmed bytes stay unknown until they are written
    again (spec: a client MUST NOT assume anything about them until then; they need not even
    read the same twice)."""

    def __init__(self, initial: bytes) -> None:
        self.data = bytearray(initial)
        self.known = bytearray(b"\x01") * len(initial)
        self.trimmed = bytearray(len(initial))
        self.active: set[Op] = set()
        self.orphans: set[Op] = set()  #: writes cut off with their connection, maybe still landing
        #: This batch's events (who, what, op, payload), to explain a mismatch.
        self.history: list[tuple[str, str, Op, bytes | None]] = []

    def log(self, who: str, what: str, op: Op, payload: bytes | None = None) -> None:
        if len(self.history) < 20000:
            self.history.append((who, what, op, payload))

    def about(self, offset: int) -> str:
        """This batch's events on `offset`, for a failure message."""
        lines = []
        for who, what, op, payload in self.history:
            if op.start <= offset < op.end:
                value = f" byte={payload[offset - op.start]:#x}" if payload is not None else ""
                name = CMD_NAMES[op.cmd] if op.cmd < len(CMD_NAMES) else str(op.cmd)
                lines.append(f"{who}: {what} {name} [{op.start}, {op.end}){value}")
        return "\n    ".join(["events on this byte in the batch:", *lines[-25:]])

    @property
    def size(self) -> int:
        return len(self.data)

    def begin(self, op: Op) -> None:
        for other in self.active:
            if other.mutates:
                op.conflicts.append((other.start, other.end, other.cmd == TRIM))
            if op.mutates:
                other.conflicts.append((op.start, op.end, op.cmd == TRIM))
        self.active.add(op)

    def end(self, op: Op) -> None:
        self.active.discard(op)

    def orphan(self, op: Op) -> None:
        """No reply will come: the write may land at any time until the batch ends."""
        if op.mutates:
            self.unknown(op.start, op.end, trimmed=op.cmd == TRIM)
            self.orphans.add(op)
        else:
            self.active.discard(op)

    def unknown(self, start: int, end: int, trimmed: bool = False) -> None:
        if end > start:
            self.known[start:end] = bytes(end - start)
            if trimmed:
                self.trimmed[start:end] = b"\x01" * (end - start)

    def apply(self, op: Op, data: bytes | None) -> None:
        """`op` succeeded: `data` (None: contents undefined) is now at op.start."""
        if data is None:
            self.unknown(op.start, op.end, trimmed=True)
        else:
            self.data[op.start : op.end] = data
            self.known[op.start : op.end] = b"\x01" * (op.end - op.start)
            self.trimmed[op.start : op.end] = bytes(op.end - op.start)
        for a, b, trim in op.conflicts:
            self.unknown(max(a, op.start), min(b, op.end), trimmed=trim)

    def mismatch(self, op: Op, got: bytes, zero_only: bool = False) -> int | None:
        """Offset of the first byte of `got` (read at op.start) that the model says is wrong."""
        start, end = op.start, op.start + len(got)
        want = bytes(end - start) if zero_only else self.data[start:end]
        if got == want:
            return None
        judged = bytearray(self.known[start:end])
        for a, b, _ in op.conflicts:
            lo, hi = max(a, start), min(b, end)
            if hi > lo:
                judged[lo - start : hi - start] = bytes(hi - lo)
        for i in range(len(got)):
            if got[i] != want[i] and judged[i]:
                return start + i
        return None

    def settle(self, actual: bytes) -> None:
        """Batch over, nothing in flight: learn the unknown bytes."""
        self.history.clear()
        self.active.clear()
        self.orphans.clear()
        self.data = bytearray(actual)
        self.known = self.trimmed.translate(_NOT)


# The node shapes ------------------------------------------------------------------------------


@dataclass
class Target:
    """A node under fuzz, its chain, and what the model starts from."""

    name: str
    node: Proc
    procs: list[Proc]  #: every process of the shape, the node under test first
    initial: bytes
    read_only: bool = False
    #: Run after a final flush with the export's contents: checks on what lies below.
    #: ... and the bytes trimmed since they were last written (they may differ below).
    check_below: Callable[[bytes, bytearray], None] | None = None
    block_min: int = 1
    block_max: int = 32 * MiB
    #: What the export does with write-side requests that pass the protocol's checks:
    #: "store" (a disk), "discard" (null: accepted, reads stay zero), "full" (every write,
    #: trim and zero fails ENOSPC, a fast zero ENOTSUP), "match" (random: a write succeeds iff
    #: it writes what is there, else EIO; trim and zero always EIO), "sparse-match"
    #: (sparse-random: as "match", and trim and zero succeed iff the range is all holes).
    writes: str = "store"
    #: Any request that would succeed may instead fail with EIO (an error filter); a write that
    #: fails leaves its range unknown.
    injects: bool = False
    #: Every fast zero fails with ENOTSUP (nozero's emulate mode).
    fast_zero_fails: bool = False
    #: Block status must report everything as plain data (noextents).
    all_data: bool = False
    #: Byte ranges [start, end) whose bytes a write, trim or zero must not change (protect):
    #: such a request fails with EPERM, unless it leaves them as they are.
    protected: list[tuple[int, int]] = field(default_factory=list)
    #: ... with this error instead (partitioning: EIO, as nbdkit), and trims of them may pass
    #: (as hints that leave the bytes as they are: partitioning's table).
    protected_errno: int = EPERM
    protected_trims_pass: bool = False
    #: Several exports (name -> initial contents) instead of the default one.
    exports: dict[bytes, bytes] | None = None
    #: Per export name, as check_below (several exports).
    check_named: Callable[[bytes, bytes, bytearray], None] | None = None
    #: Names that lead to one of `exports` (name -> that export's name): the same bytes, told
    #: by that name (INFO_NAME, exportname's default-export).
    aliases: dict[bytes, bytes] = field(default_factory=dict)
    #: What NBD_OPT_LIST shows (None: the names of `exports`), or the error it gets instead.
    listed: list[bytes] | None = None
    list_error: int = 0
    #: The description of each export by its canonical name (LIST, INFO_DESCRIPTION), if judged.
    describe: Callable[[bytes], bytes] | None = None
    #: More names the node must refuse (INFO, GO, the meta context options, EXPORT_NAME):
    #: ERR_UNKNOWN, or ERR_INVALID for one that is no NBD string (over 4096 bytes, not UTF-8, a
    #: NUL). Choosing names is what such a node is about: half its clients try many of them.
    refused: list[bytes] = field(default_factory=list)
    #: Every name leads to an export (info): what it holds for a name, None for a name the
    #: node must refuse. `exports` are then the names libnbd reads back after each batch.
    export_of: Callable[[bytes], bytes | None] | None = None
    #: Each connection has a disk of its own, whatever name it asks for, fresh from what
    #: export_of says (tmpdisk): a client's writes are judged by a model of its own, and no
    #: other client, nor libnbd after the batch, may see them.
    private: bool = False
    #: ... or, where every name leads to an export, one made for a new name keeps what clients
    #: write to it (ondemand): its model is kept, and read back after each batch too.
    persistent: bool = False
    #: The contents change from read to read (info's clocks): never learnt, but each read is
    #: judged by this: (offset, bytes, monotonic time before the reader connected) -> what is
    #: wrong with them, or None.
    volatile: Callable[[int, bytes, float], str | None] | None = None
    #: Run around each batch (e.g. to arm an error filter's trigger file only during it).
    before_batch: Callable[[], None] | None = None
    after_batch: Callable[[], None] | None = None
    #: Run after every process stopped: checks on what the node left behind (logs, stats).
    after_stop: Callable[[], None] | None = None
    seconds: float = FUZZ_SECONDS
    #: The node's --tls for its clients (off, on, require), the test CA's directory its
    #: clients and libnbd trust, and the contexts the fuzz clients pick from.
    tls: str = "off"
    pki: Path | None = None
    tls_contexts: list[ssl.SSLContext] = field(default_factory=list)
    #: What a session that stays plaintext is served instead, under every name it asks for
    #: (tls-fallback's notice): these bytes, read-only and with nothing else advertised. None
    #: of its requests may reach the export, which libnbd reads back over TLS.
    plaintext: bytes | None = None
    #: The node serves at most this many clients at once (limit, noparallel's connections):
    #: no more get replies side by side (0: not judged).
    limit: int = 0
    #: ... and a client may be turned away while it is full (a limit below a batch's clients):
    #: closed before the greeting, its INFO, GO or meta context option refused ERR_UNKNOWN, its
    #: EXPORT_NAME answered by the end of the connection, or closed after its handshake before
    #: any reply (nbdkit-limit-filter's ways, and the race its manual tells of).
    refuses: bool = False
    #: Whether the node advertises multi-conn (None: not judged).
    multi_conn: bool | None = None
    #: Connections the harness keeps open through the whole run (exitlast: so the node never
    #: sees its last client leave): a batch's sessions have ended when only these are open.
    held: int = 0
    #: Run after each batch once only `held` sessions are open: what the node's status must
    #: say then (a filter counts no client that has gone).
    when_idle: Callable[[], None] | None = None
    #: Instead of SIGTERM at the end: makes the node under test exit by itself (exitlast,
    #: exitwhen) and checks that it did, with status 0.
    ends_itself: Callable[[], None] | None = None
    #: Run when the shape is torn down, whether the run passed or not (a held connection).
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.initial)

    @property
    def names(self) -> list[bytes]:
        return sorted(self.exports) if self.exports is not None else [b""]

    def initial_of(self, name: bytes) -> bytes:
        return self.exports[name] if self.exports is not None else self.initial

    def model(self, initial: bytes) -> Model:
        model = Model(initial)
        if self.volatile is not None:
            model.unknown(0, model.size, trimmed=True)  # "need not read the same twice"
        return model

    def uri(self, name: bytes = b"") -> str:
        if self.tls != "off":
            scheme, pki = "nbds+unix", f"&tls-certificates={urllib.parse.quote(str(self.pki))}"
        elif not name:
            return self.node.uri
        else:
            scheme, pki = "nbd+unix", ""
        return f"{scheme}:///{urllib.parse.quote(name)}?socket={self.node.socket}{pki}"


def under_test(
    start_node: Any,
    kind: str,
    *args: str,
    upstreams: Sequence[str] = (),
    extra: tuple[str, ...] = (),
    control: bool = False,
    env: dict[str, str] | None = None,
) -> Proc:
    """The node the fuzz clients talk to: with metrics, to tell when its sessions are over."""
    extra = (*extra, "--metrics", "127.0.0.1:0")
    return start_node(kind, *args, upstreams=upstreams, extra=extra, control=control, env=env)


def sessions_open(node: Proc, timeout: float) -> int:
    try:
        with urllib.request.urlopen(f"http://{node.metrics}/metrics", timeout=timeout) as r:
            text = r.read().decode()
    except OSError as exc:  # a timeout too
        raise FuzzFailure(
            f"the node's metrics did not answer within {timeout:.1f} s: {exc}"
        ) from None
    match = re.search(r"^nbdfabric_connections_open\{[^}]*\} ([0-9.]+)$", text, re.M)
    assert match, "no nbdfabric_connections_open metric"
    return int(float(match.group(1)))


# libnbd with bounded waits: its blocking calls wait forever for a node that stopped answering,
# and pytest-timeout's alarm cannot end them (libnbd polls again after the signal). So the
# harness drives libnbd's state machine itself and gives up after REPLY_TIMEOUT.


def run_until(h: Any, done: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + REPLY_TIMEOUT
    while not done():
        left = deadline - time.monotonic()
        check(left > 0, f"libnbd: no answer to {what} within {REPLY_TIMEOUT} s (a hang)")
        h.poll(max(1, int(min(left, 1.0) * 1000)))


def command(h: Any, cookie: int, what: str) -> None:
    """Wait for the command `cookie` (its failure raises nbd.Error, as a blocking call would)."""
    run_until(h, lambda: h.aio_command_completed(cookie), what)


@contextlib.contextmanager
def libnbd(uri: str) -> Iterator[Any]:
    """A handle connected as conftest's nbd_connect connects, for aio_* calls and command()."""
    import nbd

    h = nbd.NBD()
    h.set_request_structured_replies(True)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.set_uri_allow_local_file(True)  # a TLS URI's tls-certificates= (as nbdinfo allows it)
    h.aio_connect_uri(uri)
    run_until(h, lambda: not h.aio_is_connecting(), f"the handshake with {uri}")
    check(h.aio_is_ready(), f"libnbd could not connect to {uri}")
    yield h
    h.aio_disconnect(0)
    run_until(h, lambda: h.aio_is_closed() or h.aio_is_dead(), f"the disconnect from {uri}")


def fill(uri: str, data: bytes, offset: int = 0) -> None:
    import nbd

    with libnbd(uri) as h:
        for pos in range(0, len(data), 4 * MiB):
            chunk = nbd.Buffer.from_bytearray(bytearray(data[pos : pos + 4 * MiB]))
            command(h, h.aio_pwrite(chunk, offset + pos), f"a write to {uri}")
        command(h, h.aio_flush(), f"a flush of {uri}")


def read_all(uri: str, flush: bool = False) -> bytes:
    import nbd

    with libnbd(uri) as h:
        if flush and not h.is_read_only():
            command(h, h.aio_flush(), f"a flush of {uri}")
        size, out = h.get_size(), bytearray()
        for pos in range(0, size, 4 * MiB):
            buf = nbd.Buffer(min(4 * MiB, size - pos))
            command(h, h.aio_pread(buf, pos), f"a read of {uri} at {pos}")
            out += buf.to_bytearray()
        return bytes(out)


def marked(size: int) -> bytearray:
    return bytearray((MARKER * (size // len(MARKER) + 1))[:size])


def window_shape(
    name: str,
    start_node: Any,
    kind: str,
    args: list[str],
    upstream_size: int,
    window: tuple[int, int],
    table: bytes = b"",
) -> Target:
    """A view of [window) of a memory upstream whose every other byte is MARKER (and `table` at
    the front): those must never show, nor change."""
    lo, hi = window
    up = start_node("memory", str(upstream_size))
    rng = random.Random(f"{SEED}:{name}:initial")
    outside = marked(upstream_size)
    outside[: len(table)] = table
    inside = rng.randbytes(hi - lo)
    image = bytes(outside[:lo]) + inside + bytes(outside[hi:])
    fill(up.uri, image)
    node = under_test(start_node, kind, *args, upstreams=[up.uri])

    def below(export: bytes, trimmed: bytearray) -> None:
        now = read_all(up.uri)
        check(now[:lo] == image[:lo] and now[hi:] == image[hi:], "bytes outside the window changed")
        bad = differ(now[lo:hi], export, trimmed)
        check(bad is None, f"the upstream's window differs from the export at {bad}")

    return Target(name, node, [node, up], inside, check_below=below)


def mbr(first_lba: int, sectors: int) -> bytes:
    entry = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", first_lba, sectors)
    return bytes(446) + entry.ljust(64, b"\0") + b"\x55\xaa"


def build_target(shape: str, start_node: Any, tmp_path: Path) -> Target:
    rng = random.Random(f"{SEED}:{shape}:initial")
    if shape == "memory":
        node = under_test(start_node, "memory", str(SIZE))
        return Target(shape, node, [node], bytes(SIZE))
    if shape in ("file", "read-only"):
        path = tmp_path / f"{shape}.img"
        image = rng.randbytes(SIZE)
        path.write_bytes(image)
        ro = shape == "read-only"
        node = under_test(start_node, "file", str(path), extra=("--read-only",) if ro else ())

        def file_below(export: bytes, trimmed: bytearray) -> None:
            bad = differ(path.read_bytes(), export, trimmed)
            check(bad is None, f"the file differs from what the export serves at {bad}")

        return Target(shape, node, [node], image, read_only=ro, check_below=file_below)
    if shape in ("cow", "cache", "blocksize"):
        up = start_node("memory", str(SIZE))
        image = rng.randbytes(SIZE)
        fill(up.uri, image)
        args = {
            "cow": ["cow-block-size=4K"],
            "cache": ["cache=writeback", "cache-max-size=256K", "cache-min-block-size=4K"],
            "blocksize": ["minblock=4K", "maxdata=64K", "maxlen=128K"],
        }[shape]
        node = under_test(start_node, shape, *args, upstreams=[up.uri])

        def below(export: bytes, trimmed: bytearray) -> None:
            now = read_all(up.uri)
            if shape == "cow":
                check(now == image, "cow wrote to its upstream")
            else:
                bad = differ(now, export, trimmed)
                check(bad is None, f"{shape}: after a flush the upstream differs at {bad}")

        return Target(shape, node, [node, up], image, check_below=below)
    if shape in ("offset", "offset-libnbd"):  # relaying (the default), or re-issuing
        return window_shape(
            shape,
            start_node,
            "offset",
            ["offset=256K", "range=1M", *(["relay=false"] if shape == "offset-libnbd" else [])],
            2 * MiB,
            (256 * KiB, 256 * KiB + MiB),
        )
    if shape == "truncate":
        # An odd size: the last "sector" is one byte long.
        return window_shape(shape, start_node, "truncate", ["truncate=800001"], MiB, (0, 800001))
    if shape == "partition":
        lo = 1024 * 512
        return window_shape(
            shape,
            start_node,
            "partition",
            ["partition=1"],
            2 * MiB,
            (lo, lo + MiB),
            table=mbr(1024, 2048),
        )
    if shape == "mirror":
        members = [start_node("memory", str(SIZE)) for _ in range(2)]
        node = under_test(start_node, "mirror", upstreams=[m.uri for m in members])

        def mirror_below(export: bytes, trimmed: bytearray) -> None:
            for i, m in enumerate(members):
                bad = differ(read_all(m.uri), export, trimmed)
                check(bad is None, f"mirror member {i} differs from the export at {bad}")

        return Target(shape, node, [node, *members], bytes(SIZE), check_below=mirror_below)
    if shape == "parity":
        members = [start_node("memory", str(SIZE // 2)) for _ in range(3)]
        node = under_test(
            start_node, "parity", "chunk-size=64K", upstreams=[m.uri for m in members]
        )

        def parity_below(export: bytes, trimmed: bytearray) -> None:
            chunks = [read_all(m.uri) for m in members]
            for pos in range(0, SIZE // 2, 64 * KiB):
                xor = bytes(64 * KiB)
                for c in chunks:
                    xor = bytes(a ^ b for a, b in zip(xor, c[pos : pos + 64 * KiB], strict=True))
                check(xor == bytes(64 * KiB), f"parity of the stripe at {pos} does not check out")

        return Target(shape, node, [node, *members], bytes(SIZE), check_below=parity_below)
    raise ValueError(shape)


def memory_with(start_node: Any, image: bytes) -> Proc:
    up = start_node("memory", str(len(image)))
    fill(up.uri, image)
    return up


def same_below(shape: str, uri: str) -> Callable[[bytes, bytearray], None]:
    """After a flush, what `uri` (the upstream) holds is the export."""

    def below(export: bytes, trimmed: bytearray) -> None:
        bad = differ(read_all(uri), export, trimmed)
        check(bad is None, f"{shape}: after a flush the upstream differs at {bad}")

    return below


def members_below(shape: str, members: list[Proc]) -> Callable[[bytes, bytearray], None]:
    """Every member holds the export (mirror-like fans)."""

    def below(export: bytes, trimmed: bytearray) -> None:
        for i, m in enumerate(members):
            bad = differ(read_all(m.uri), export, trimmed)
            check(bad is None, f"{shape} member {i} differs from the export at {bad}")

    return below


def lumpy(rng: random.Random, size: int) -> bytes:
    """An image of random runs, zero runs and runs of one byte (compressible, with holes)."""
    out = bytearray()
    while len(out) < size:
        n = rng.choice([512, 4096, 3000, 64 * KiB])
        out += rng.choice([rng.randbytes(n), bytes(n), bytes([rng.randrange(256)]) * n])
    return bytes(out[:size])


def trigger(path: Path) -> tuple[Callable[[], None], Callable[[], None]]:
    """An error filter's trigger file, there only while a batch runs (libnbd checks read
    with no errors injected)."""
    return path.touch, lambda: path.unlink(missing_ok=True)


#: The filters about connections and the node's lifetime: shape -> (kind, params). A batch has
#: up to 6 clients at once.
CONNECTION_SHAPES = {
    "multi-conn-emulate": ("multi-conn", ["multi-conn-mode=emulate"]),
    "multi-conn-fast": ("multi-conn", ["multi-conn-mode=plugin", "multi-conn-track-dirty=fast"]),
    "multi-conn-disable": ("multi-conn", ["multi-conn-mode=disable", "multi-conn-track-dirty=off"]),
    "noparallel": ("noparallel", ["serialize=requests"]),
    "noparallel-all": ("noparallel", ["serialize=all-requests"]),
    "noparallel-connections": ("noparallel", ["serialize=connections"]),
    "limit": ("limit", ["limit=6"]),  # as many as a batch's clients: none is refused
    "limit-2": ("limit", ["limit=2"]),
    "exitlast": ("exitlast", []),
    "exitwhen": ("exitwhen", ["exit-when-file-created={stop}", "exit-when-poll=1"]),
    "exitwhen-script": (
        "exitwhen",
        ["exit-when-script=test ! -e {stop} || exit 88", "exit-when-poll=1"],
    ),
}
#: What each kind's status counts, as it must be with no client connected (those held aside).
IDLE_STATUS = {
    "multi-conn": ("multi_conn", {"connections": 0}),
    "limit": ("limit", {"connected": 0}),
    "exitlast": ("exitlast", {"connected": 1}),  # the held connection
    "exitwhen": ("exitwhen", {"connected": 0, "exiting": False}),
}


def files_shape(shape: str, start_node: Any, tmp_path: Path, rng: random.Random) -> Target:
    """Files of odd sizes (none a whole number of sectors, one sparse) end to end (split), or
    as partitions behind an MBR (partitioning, 4K-aligned: its table and padding change only
    to themselves, else EIO). The initial disk of partitioning is nbdkit's over the same files
    (byte for byte ours); after a flush the files hold what the export serves there."""
    sizes = [300001, 400003, 200005]
    paths = []
    for i, size in enumerate(sizes):
        paths.append(tmp_path / f"part{i}.img")
        data = lumpy(rng, size) if i == 1 else rng.randbytes(size)
        paths[-1].write_bytes(data)
    if shape == "split":
        node = under_test(start_node, "split", *map(str, paths))
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        image, protected = b"".join(p.read_bytes() for p in paths), []
    else:
        words = ["alignment=4K", *map(str, paths)]
        out = subprocess.run(["nbdkit", "-U", "-", "partitioning", *words, "--run",
                              "nbdcopy \"$uri\" -"], capture_output=True, check=True)  # fmt: skip
        image = out.stdout
        # MBR entries: (status, CHS, type, CHS, first sector, sectors)
        starts = [struct.unpack_from("<B3sB3sII", image, 446 + 16 * i)[4] * 512 for i in range(3)]
        edges = [
            0,
            *(x for at, n in zip(starts, sizes, strict=True) for x in (at, at + n)),
            len(image),
        ]
        protected = list(zip(edges[::2], edges[1::2], strict=True))
        node = under_test(start_node, "partitioning", *words)

    def files_below(export: bytes, trimmed: bytearray) -> None:
        for path, at, size in zip(paths, starts, sizes, strict=True):
            bad = differ(path.read_bytes(), export[at : at + size], trimmed[at : at + size])
            check(bad is None, f"{path.name} differs from the export at {at} + {bad}")

    t = Target(shape, node, [node], image, check_below=files_below, protected=protected)
    t.protected_errno, t.protected_trims_pass = EIO, True
    return t


#: nbdkit-eval-plugin(1)'s file plugin, as inline scripts (thread_model: the default, one
#: request at a time in the node).
EVAL_DISK = [
    'config=ln -sf "$(realpath "$3")" $tmpdir/file',
    "get_size=stat -Lc %s $tmpdir/file",
    "pread=dd if=$tmpdir/file skip=$4 count=$3 iflag=count_bytes,skip_bytes status=none",
    "pwrite=dd of=$tmpdir/file seek=$4 conv=notrunc oflag=seek_bytes status=none",
    "flush=sync $tmpdir/file",
    "trim=fallocate -p -o $4 -l $3 -n $tmpdir/file",
    "zero=fallocate -p -o $4 -l $3 -n $tmpdir/file",
    "extents=echo $4 $3",
]


def script_shape(shape: str, start_node: Any, tmp_path: Path, rng: random.Random) -> Target:
    """A disk in a file served by a script: sh runs test_plugins_sh's bash one (parallel
    requests, FUA native, cache emulated), eval the inline EVAL_DISK. Each request is a fork
    or two: the node must answer every one, whatever the script does in between."""
    from test_plugins_sh import DISK

    path = tmp_path / f"{shape}.img"
    image = lumpy(rng, SIZE)
    path.write_bytes(image)
    if shape == "sh":
        script = tmp_path / "disk.sh"
        script.write_text(DISK)
        script.chmod(0o755)
        node = under_test(start_node, "sh", str(script), f"file={path}")
    else:
        node = under_test(start_node, "eval", *EVAL_DISK, f"file={path}")

    def script_below(export: bytes, trimmed: bytearray) -> None:
        bad = differ(path.read_bytes(), export, trimmed)
        check(bad is None, f"the file behind the script differs from the export at {bad}")

    return Target(shape, node, [node], image, check_below=script_below)


def python_shape(start_node: Any, tmp_path: Path, rng: random.Random) -> Target:
    """test_plugin_python's sparse RAM disk (a Python script for nbdkit's python plugin, in
    64K blocks, holes and allocated zeros in its extents, FUA native, cache emulated, the
    parallel thread model): every callback on a worker thread, whatever the clients do."""
    from test_plugin_python import SPARSE

    script = tmp_path / "sparse.py"
    script.write_text(SPARSE)
    node = under_test(start_node, "python", str(script), f"size={SIZE}")
    image = lumpy(rng, SIZE)
    fill(node.uri, image)
    # The script names its exports: "sparse" (the default) and "other", one disk.
    t = Target("python", node, [node], image)
    t.exports = {b"sparse": image}
    t.aliases = {b"": b"sparse"}  # ("other" is the same disk, told as "other")
    t.listed = [b"sparse", b"other"]
    return t


def connection_shape(shape: str, start_node: Any, tmp_path: Path, rng: random.Random) -> Target:
    """A filter about connections over a memory disk of random data (multi-conn: a writeback
    cache in between): the data as any filter's, and what the filter does with clients
    (refuses them, serializes them, counts them, exits when told) as the batches come and go."""
    image = rng.randbytes(SIZE)
    up = memory_with(start_node, image)
    stop = tmp_path / "stop"  # exitwhen's event: only made at the very end
    kind, params = CONNECTION_SHAPES[shape]
    args = [a.format(stop=stop) for a in params]
    idle = IDLE_STATUS.get(kind)
    below = [up]
    if kind == "multi-conn":
        # Writes wait in a writeback cache for a flush: one skipped that was owed leaves the
        # disk behind what the export served, after the final flush (check_below).
        below.insert(0, start_node("cache", "cache=writeback", upstreams=[up.uri]))
    node = under_test(start_node, kind, *args, upstreams=[below[0].uri], control=bool(idle))
    t = Target(shape, node, [node, *below], image, check_below=same_below(shape, up.uri))
    # memory advertises multi-conn: emulate and plugin keep it, serialized clients do not.
    t.multi_conn = shape not in ("multi-conn-disable", "noparallel-connections")
    if kind == "limit":
        t.limit = int(args[0].removeprefix("limit="))
        t.refuses = t.limit < 6
    if shape == "noparallel-connections":
        # One client at a time: the others wait, accepted but not greeted, for their turn (a
        # batch's clients take turns, each within REPLY_TIMEOUT of connecting).
        t.limit = 1
    if kind == "exitlast":
        held = contextlib.ExitStack()  # opened first: no client before it can be the last
        held.enter_context(libnbd(node.uri))
        t.held = 1
        t.cleanups.append(held.close)
        t.ends_itself = lambda: exits_alone(node, held.close, "its last client left")
    if kind == "exitwhen":
        t.ends_itself = lambda: exits_alone(node, stop.touch, f"{stop} was created")
    if idle is not None:
        control = Control(node)
        t.cleanups.append(control.channel.close)
        key, want = idle

        def when_idle() -> None:
            state = control.status().get(key, {})
            got = {k: state.get(k) for k in want}
            check(got == want, f"[{shape}] no client is connected, yet its status says {state}")

        t.when_idle = when_idle
    return t


class Pauser:
    """Pauses and resumes a pause node through its control socket at random moments while a
    batch runs (one connection: `p`, its `P`, a moment, `r`, its `R`, a moment, ...), and
    resumes it for good when the batch is over. Each answer must come within REPLY_TIMEOUT."""

    def __init__(self, path: Path, rng: random.Random) -> None:
        self.path, self.rng = path, rng
        self.done = threading.Event()
        self.thread: threading.Thread | None = None
        self.failure: str | None = None
        self.pauses = 0

    def start(self) -> None:
        self.done.clear()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _command(self, s: socket.socket, command: bytes) -> None:
        s.sendall(command)
        try:
            got = s.recv(1)
        except TimeoutError:
            got = b"(nothing within the timeout)"
        if got != command.upper():
            raise FuzzFailure(f"pause-control: {command!r} was answered {got!r}")

    def _run(self) -> None:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(REPLY_TIMEOUT)
                s.connect(str(self.path))
                while not self.done.wait(self.rng.uniform(0, 0.03)):
                    self._command(s, b"p")
                    self.pauses += 1
                    self.done.wait(self.rng.uniform(0, 0.03))
                    self._command(s, b"r")
        except (OSError, FuzzFailure) as exc:
            self.failure = f"the pauser failed: {exc}"

    def stop(self) -> None:
        self.done.set()
        if self.thread is not None:
            self.thread.join(REPLY_TIMEOUT + 5)
            check(not self.thread.is_alive(), "the pauser is stuck")
            self.thread = None
        with socket.socket(socket.AF_UNIX) as s:  # resumed, whatever the pauser got to
            s.settimeout(REPLY_TIMEOUT)
            s.connect(str(self.path))
            s.sendall(b"r")
            check(s.recv(1) == b"R", "pause-control: r not answered R")
        failure, self.failure = self.failure, None
        check(failure is None, str(failure))


def pause_shape(start_node: Any, tmp_path: Path, rng: random.Random) -> Target:
    """pause over a memory disk of random data, paused and resumed through its control socket
    at random moments while each batch runs: requests held meanwhile are answered once it
    resumes, within the harness's bounds, as any others (a client that leaves while its
    requests are held loses only those, as it would lose them in flight); resumed between
    batches, when its status must show nothing held."""
    image = rng.randbytes(SIZE)
    up = memory_with(start_node, image)
    sock = tmp_path / "pause.ctl"
    node = under_test(
        start_node, "pause", f"pause-control={sock}", upstreams=[up.uri], control=True
    )
    pauser = Pauser(sock, random.Random(f"{SEED}:pause:pauser"))
    t = Target("pause", node, [node, up], image, check_below=same_below("pause", up.uri))
    t.before_batch, t.after_batch = pauser.start, pauser.stop
    control = Control(node)
    t.cleanups += [pauser.done.set, control.channel.close]

    def when_idle() -> None:
        state = control.status().get("pause", {})
        got = {k: state.get(k) for k in ("paused", "held")}
        check(got == {"paused": False, "held": 0}, f"[pause] resumed and idle, yet {state}")

    t.when_idle = when_idle
    t.after_stop = lambda: check(pauser.pauses > 0, "[pause] the run never paused the node")
    return t


def exits_alone(node: Proc, act: Callable[[], None], what: str) -> None:
    """After `act` the node must exit by itself, with status 0 (within REPLY_TIMEOUT: a bound
    on a hang, not a speed)."""
    check(node.proc.poll() is None, f"the node exited before {what}: {node.stderr()[-2000:]}")
    act()
    try:
        status = node.proc.wait(REPLY_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise FuzzFailure(f"the node did not exit within {REPLY_TIMEOUT} s after {what}") from None
    check(status == 0, f"the node exited {status} after {what}: {node.stderr()[-2000:]}")


def cdi_shape(start_node: Any, tmp_path: Path, rng: random.Random) -> Target:
    """A containerDisk built here (`FROM scratch`, `ADD disk.img /disk/`, random bytes) and
    served by a cdi node, read-only, the same to the end; the image is removed after. Without
    a docker engine the shape skips (fails under CI), as tests/test_plugin_cdi.py does."""
    try:
        import docker

        engine = docker.from_env()
        engine.ping()
    except Exception as exc:  # any failure to reach the engine
        if os.environ.get("CI"):
            pytest.fail(f"no docker engine: {exc}")
        pytest.skip(f"no docker engine: {exc}")
    context = tmp_path / "cdi-context"
    context.mkdir()
    (context / "disk.img").write_bytes(lumpy(rng, SIZE))
    (context / "Dockerfile").write_text("FROM scratch\nADD disk.img /disk/\n")
    tag = f"nbdfabric-fuzz-cdi-{os.getpid()}-{rng.randrange(1 << 32):08x}:latest"
    engine.images.build(path=str(context), tag=tag, rm=True, forcerm=True)
    try:
        node = under_test(start_node, "cdi", tag)
        image = read_all(node.uri)
    except BaseException:
        engine.images.remove(tag, force=True)
        raise
    target = Target("cdi", node, [node], image, read_only=True, multi_conn=True)
    target.cleanups.append(lambda: engine.images.remove(tag, force=True))
    return target


def ssh_shape(start_node: Any, tmp_path: Path, rng: random.Random) -> Target:
    """A file served by a private sshd (tests/ssh_server.py) through the ssh plugin, written
    by the fuzz clients: after each batch the remote file holds what the export serves."""
    why = ssh_server.usable()
    if why is not None:
        pytest.skip(why)
    server = ssh_server.Sshd(tmp_path / "sshd")
    try:
        path = tmp_path / "remote.img"
        image = rng.randbytes(SIZE - 1000)  # a tail that is not whole sectors
        path.write_bytes(image)
        node = under_test(start_node, "ssh", *server.args(), str(path))
    except BaseException:
        server.stop()
        raise

    def ssh_below(export: bytes, trimmed: bytearray) -> None:
        bad = differ(path.read_bytes(), export, trimmed)
        check(bad is None, f"the remote file differs from what the export serves at {bad}")

    target = Target("ssh", node, [node], image, check_below=ssh_below, multi_conn=True)
    target.cleanups.append(server.stop)
    return target


def build_more(shape: str, start_node: Any, tmp_path: Path, start_http: Any) -> Target:
    """The shapes added after the first eleven."""
    rng = random.Random(f"{SEED}:{shape}:initial")
    seed = str(rng.randrange(1 << 31))
    if shape in CONNECTION_SHAPES:
        return connection_shape(shape, start_node, tmp_path, rng)
    if shape == "offset-libnbd":  # the offset window, re-issuing instead of relaying
        return build_target(shape, start_node, tmp_path)
    if shape == "pause":
        return pause_shape(start_node, tmp_path, rng)
    if shape.startswith("info"):
        return info_shape(shape, start_node, rng)
    if shape.startswith("exportname"):
        return exportname_shape(shape, start_node, tmp_path, rng)
    if shape in ("http", "http-cow"):
        image = rng.randbytes(SIZE - 1000)  # a tail that is not whole sectors
        url = start_http(image)
        if shape == "http":
            node = under_test(start_node, "http", url)
            return Target(shape, node, [node], image, read_only=True)
        http = start_node("http", url)
        node = under_test(start_node, "cow", "cow-block-size=4K", upstreams=[http.uri])

        def http_below(export: bytes, trimmed: bytearray) -> None:
            check(read_all(http.uri) == image, "the http node no longer serves the image")

        return Target(shape, node, [node, http], image, check_below=http_below)
    if shape == "ssh":
        return ssh_shape(start_node, tmp_path, rng)
    if shape == "concat":
        sizes = [256 * KiB, 512 * KiB, 256 * KiB]
        images = [rng.randbytes(n) for n in sizes]
        members = [memory_with(start_node, im) for im in images]
        node = under_test(start_node, "concat", upstreams=[m.uri for m in members])

        def concat_below(export: bytes, trimmed: bytearray) -> None:
            now = b"".join(read_all(m.uri) for m in members)
            bad = differ(now, export, trimmed)
            check(bad is None, f"the members laid end to end differ from the export at {bad}")

        image = b"".join(images)
        return Target(shape, node, [node, *members], image, check_below=concat_below)
    if shape in ("split", "partitioning"):
        return files_shape(shape, start_node, tmp_path, rng)
    if shape in ("sh", "eval"):
        return script_shape(shape, start_node, tmp_path, rng)
    if shape == "python":
        return python_shape(start_node, tmp_path, rng)
    if shape == "stripe":
        chunk, n = 64 * KiB, 4
        members = [start_node("memory", str(SIZE // n)) for _ in range(n)]
        node = under_test(
            start_node, "stripe", f"chunk-size={chunk}", upstreams=[m.uri for m in members]
        )
        image = rng.randbytes(SIZE)
        fill(node.uri, image)

        def stripe_below(export: bytes, trimmed: bytearray) -> None:
            held = [read_all(m.uri) for m in members]
            now = b"".join(
                held[k % n][(k // n) * chunk : (k // n + 1) * chunk] for k in range(SIZE // chunk)
            )
            bad = differ(now, export, trimmed)
            check(bad is None, f"the members' chunks differ from the export at {bad}")

        return Target(shape, node, [node, *members], image, check_below=stripe_below)
    if shape in ("quorum", "verify"):
        image = rng.randbytes(SIZE)
        members = [memory_with(start_node, image) for _ in range(3 if shape == "quorum" else 2)]
        node = under_test(start_node, shape, upstreams=[m.uri for m in members])
        below = members_below(shape, members)
        return Target(shape, node, [node, *members], image, check_below=below)
    if shape == "tmpdisk":
        return tmpdisk_shape(start_node, tmp_path, rng)
    if shape == "ondemand":
        return ondemand_shape(start_node, tmp_path, rng)
    if shape == "linuxdisk":
        # A file system of random files in a GPT partition, read-only: what it serves at
        # first it must serve to the end (and refuse every write).
        tree = tmp_path / "tree"
        (tree / "sub").mkdir(parents=True)
        (tree / "a.bin").write_bytes(rng.randbytes(300 * KiB))
        (tree / "sub" / "b.bin").write_bytes(lumpy(rng, 200 * KiB))
        (tree / "link").symlink_to("sub/b.bin")
        node = under_test(start_node, "linuxdisk", str(tree), "type=ext4", "label=fuzz")
        image = read_all(node.uri)
        return Target(shape, node, [node], image, read_only=True, multi_conn=True)
    if shape == "iso":
        # An ISO of random files from two directories, read-only, the same to the end.
        tree, more = tmp_path / "tree", tmp_path / "more"
        (tree / "sub").mkdir(parents=True)
        more.mkdir()
        (tree / "a.bin").write_bytes(rng.randbytes(300 * KiB))
        (tree / "sub" / "b.bin").write_bytes(lumpy(rng, 200 * KiB))
        (more / "c.bin").write_bytes(rng.randbytes(5000))
        node = under_test(start_node, "iso", str(tree), f"dir={more}", "params=-J -r -V fuzz")
        image = read_all(node.uri)
        return Target(shape, node, [node], image, read_only=True, multi_conn=True)
    if shape == "floppy":
        # A FAT32 of random files in an MBR partition, read-only, the same to the end.
        tree = tmp_path / "tree"
        (tree / "sub").mkdir(parents=True)
        (tree / "a.bin").write_bytes(rng.randbytes(300 * KiB))
        (tree / "sub" / "b b.bin").write_bytes(lumpy(rng, 200 * KiB))
        node = under_test(start_node, "floppy", str(tree), "label=FUZZ")
        image = read_all(node.uri)
        return Target(shape, node, [node], image, read_only=True, multi_conn=True)
    if shape == "cdi":
        return cdi_shape(start_node, tmp_path, rng)
    if shape == "dir":
        folder = tmp_path / "disks"
        folder.mkdir()
        (folder / "sub").mkdir()  # left out of the list, and refused as a name
        exports = {
            b"a.img": rng.randbytes(SIZE),
            b"b.img": lumpy(rng, 256 * KiB + 4096),
            b"c d.img": bytes(64 * KiB),
        }
        for name, image in exports.items():
            (folder / name.decode()).write_bytes(image)
        node = under_test(start_node, "file", f"dir={folder}")

        def dir_below(name: bytes, export: bytes, trimmed: bytearray) -> None:
            bad = differ((folder / name.decode()).read_bytes(), export, trimmed)
            check(bad is None, f"file {name!r} differs from its export at {bad}")

        return Target(shape, node, [node], b"", exports=exports, check_named=dir_below)
    if shape in ("pattern", "zero", "null", "full"):
        node = under_test(start_node, shape, str(SIZE))
        image = bytes(SIZE)
        if shape == "pattern":
            image = b"".join(struct.pack(">Q", o) for o in range(0, SIZE, 8))
        writes = {"null": "discard", "full": "full"}.get(shape, "store")
        ro = shape in ("pattern", "zero")
        return Target(shape, node, [node], image, read_only=ro, writes=writes)
    if shape == "empty":
        node = under_test(start_node, "zero")  # size 0: every request is out of range
        return Target(shape, node, [node], b"", read_only=True)
    if shape == "protect":
        # A random range at the front, one of zeros (trim and zero may go there), the tail.
        protected = [(0, 4096), (256 * KiB, 320 * KiB), (SIZE - 512, SIZE)]
        image = bytearray(rng.randbytes(SIZE))
        image[256 * KiB : 320 * KiB] = bytes(64 * KiB)
        image = bytes(image)
        up = memory_with(start_node, image)
        spec = ",".join(f"{lo}-{hi - 1}" for lo, hi in protected)
        node = under_test(start_node, "protect", f"protect={spec}", upstreams=[up.uri])

        def protect_below(export: bytes, trimmed: bytearray) -> None:
            now = read_all(up.uri)
            for lo, hi in protected:
                check(now[lo:hi] == image[lo:hi], f"protected bytes {lo}-{hi - 1} changed")
            bad = differ(now, export, trimmed)
            check(bad is None, f"protect: after a flush the upstream differs at {bad}")

        return Target(
            shape, node, [node, up], image, check_below=protect_below, protected=protected
        )
    if shape in ("random", "sparse-random"):
        args = ["percent=30", "runlength=64K"] if shape == "sparse-random" else []
        node = under_test(start_node, shape, str(SIZE), f"seed={seed}", *args)
        # The content is the node's own (its generator); the model holds it to that forever.
        image = read_all(node.uri)
        if shape == "sparse-random":
            check(any(image) and not all(image), "sparse-random without both data and holes")
        writes = "match" if shape == "random" else "sparse-match"
        return Target(shape, node, [node], image, writes=writes)
    if shape == "data":
        head = lumpy(rng, 48 * KiB)
        node = under_test(
            start_node, "data", f"base64={base64.b64encode(head).decode()}", "size=1M"
        )
        return Target(shape, node, [node], head + bytes(SIZE - len(head)))
    if shape == "qcow2dec":  # compressed, standard, zero and unallocated (sub)clusters side by side
        raw = tmp_path / "image.raw"
        raw.write_bytes(lumpy(rng, SIZE))
        packed = tmp_path / "image.qcow2"
        subprocess.run(
            [
                "qemu-img",
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-c",
                "-o",
                "cluster_size=16K,extended_l2=on",
                str(raw),
                str(packed),
            ],
            check=True,
        )
        ops = ["write -z 64K 40K", "write -P 0x5a 300001 5000", "discard 512K 32K"]
        subprocess.run(
            ["qemu-io", "-f", "qcow2", *(a for op in ops for a in ("-c", op)), str(packed)],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(packed), str(raw)], check=True
        )  # the model: what qemu reads in the image
        up = start_node("file", str(packed), extra=("--read-only",))
        node = under_test(start_node, "qcow2dec", upstreams=[up.uri])
        return Target(shape, node, [node, up], raw.read_bytes(), read_only=True)
    if shape == "luks":  # a qemu-made LUKS image of lumpy data; qemu judges what lands in it
        packed, raw, plain = tmp_path / "image.luks", tmp_path / "image.raw", tmp_path / "out.raw"
        secret = ["--object", "secret,id=s0,data=fuzz"]
        opts = f"driver=luks,key-secret=s0,file.filename={packed}"
        create = ["qemu-img", "create", "-q", "-f", "luks", *secret]
        opt = ["-o", "key-secret=s0,iter-time=10"]
        subprocess.run([*create, *opt, str(packed), str(SIZE)], check=True)
        image = lumpy(rng, SIZE)
        raw.write_bytes(image)
        subprocess.run(["qemu-img", "convert", "-n", *secret, "-f", "raw", str(raw),
                        "--target-image-opts", opts], check=True)  # fmt: skip
        up = start_node("file", str(packed))
        node = under_test(start_node, "luks", "passphrase=fuzz", upstreams=[up.uri])

        def luks_below(export: bytes, trimmed: bytearray) -> None:
            subprocess.run(["qemu-img", "convert", *secret, "--image-opts", opts, "-O", "raw",
                            str(plain)], check=True)  # fmt: skip
            bad = differ(plain.read_bytes(), export, trimmed)
            check(bad is None, f"luks: what qemu decrypts differs from the export at {bad}")

        return Target(shape, node, [node, up], image, check_below=luks_below)
    if shape in ("xz", "xz-whole", "gzip"):
        image = lumpy(rng, SIZE)
        raw = tmp_path / "image.raw"
        raw.write_bytes(image)
        if shape == "gzip":
            cmd = ["gzip", "-k", "-6", str(raw)]
        else:
            cmd = ["xz", "-k", "-3", "--check=crc64", "--block-size=64KiB", str(raw)]
        subprocess.run(cmd, check=True)
        packed = tmp_path / ("image.raw.gz" if shape == "gzip" else "image.raw.xz")
        up = start_node("file", str(packed), extra=("--read-only",))
        args = ["xz-max-block=16K"] if shape == "xz-whole" else []  # whole mode: decoded at start
        kind = "gzip" if shape == "gzip" else "xz"
        node = under_test(start_node, kind, *args, upstreams=[up.uri])
        return Target(shape, node, [node, up], image, read_only=True)
    if shape == "tar":  # the image at 1536 (not 4K-aligned) between two members, served in place
        image, buf = rng.randbytes(SIZE), io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
            for name, data in (("vm.ovf", b"<Envelope/>"), ("disk.img", image), ("vm.mf", b"m")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        archive, path, at = buf.getvalue(), tmp_path / "vm.tar", 3 * 512
        path.write_bytes(archive)
        up = start_node("file", str(path))
        node = under_test(start_node, "tar", "tar-entry=disk.img", upstreams=[up.uri])

        def tar_below(export: bytes, trimmed: bytearray) -> None:
            now = path.read_bytes()
            check(now[:at] + now[at + SIZE :] == archive[:at] + archive[at + SIZE :],
                  "tar: the archive changed outside the entry's data")  # fmt: skip
            bad = differ(now[at : at + SIZE], export, trimmed)
            check(bad is None, f"tar: the entry in the archive differs from the export at {bad}")

        return Target(shape, node, [node, up], image, check_below=tar_below)
    if shape == "ext2":  # a file of an ext4 file system (on a file node), written in place
        image, src = lumpy(rng, SIZE), tmp_path / "fs-src"
        (src / "disks").mkdir(parents=True)
        (src / "disks" / "disk.img").write_bytes(image)
        (src / "other.bin").write_bytes(rng.randbytes(100_000))
        fs = tmp_path / "fs.img"
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(fs), "8M"], check=True)
        up = start_node("file", str(fs))
        node = under_test(start_node, "ext2", "ext2file=/disks/disk.img", upstreams=[up.uri])

        def ext2_below(export: bytes, trimmed: bytearray) -> None:
            # The node flushed: the file system is clean and holds the export as the file.
            fsck = subprocess.run(["e2fsck", "-fn", str(fs)], capture_output=True, text=True)
            check(fsck.returncode == 0, f"ext2: e2fsck finds the file system unclean: "
                  f"{fsck.stdout[-400:]}")  # fmt: skip
            out = tmp_path / "dumped.img"
            subprocess.run(["debugfs", "-R", f"dump /disks/disk.img {out}", str(fs)],
                           check=True, capture_output=True)  # fmt: skip
            bad = differ(out.read_bytes(), export, trimmed)
            check(
                bad is None, f"ext2: the file in the file system differs from the export at {bad}"
            )

        return Target(shape, node, [node, up], image, check_below=ext2_below)
    if shape == "checkwrite":
        # Random runs and zero runs: writes of what is there pass, other writes fail (EIO);
        # trims and zeroes pass where the bytes are zeros. The upstream never changes.
        image = lumpy(rng, SIZE)
        up = memory_with(start_node, image)
        node = under_test(start_node, "checkwrite", upstreams=[up.uri])
        below = same_below(shape, up.uri)
        return Target(shape, node, [node, up], image, writes="check", check_below=below)
    if shape == "cacheextents":
        # Holes to begin with (only the 4K blocks that are not zeros are written): an answer
        # kept past a write would say "zero" where data now is.
        image = lumpy(rng, SIZE)
        up = start_node("memory", str(SIZE))
        for pos in range(0, SIZE, 4 * KiB):
            if any(image[pos : pos + 4 * KiB]):
                fill(up.uri, image[pos : pos + 4 * KiB], pos)
        args: list[str] = []  # the default window covers the whole disk: every later ask hits
        node = under_test(start_node, "cacheextents", *args, upstreams=[up.uri])
        return Target(shape, node, [node, up], image, check_below=same_below(shape, up.uri))
    if shape == "extentlist":
        # Read-only (as its manual asks) over a lumpy image, with a list written from the
        # image, shuffled: its 4K blocks of data listed, its blocks of zeros listed as "zero"
        # or "hole,zero" or left out (a gap: a hole that must read as zeros). Each extent
        # that says zero is judged against the bytes.
        image = lumpy(rng, SIZE)
        up = memory_with(start_node, image)
        listed = []
        for pos in range(0, SIZE, 4 * KiB):
            if any(image[pos : pos + 4 * KiB]):
                listed.append(f"{pos} 4K{rng.choice(['', ' 0'])}")
            elif rng.random() < 0.5:
                listed.append(f"{pos // 512}s 8s {rng.choice(['zero', 'hole,zero', '3'])}")
        rng.shuffle(listed)
        path = tmp_path / "image.extents"
        path.write_text("# from the image\n" + "\n".join(listed) + "\n")
        node = under_test(start_node, "extentlist", f"extentlist={path}", upstreams=[up.uri],
                          extra=("--read-only",))  # fmt: skip
        return Target(shape, node, [node, up], image, read_only=True)
    if shape == "ddrescue":
        # Every block of the disk finished, in blocks cut at random (finished neighbours are
        # one run), and unfinished blocks past the disk's end: every read passes, read-only.
        image = rng.randbytes(SIZE)
        up = memory_with(start_node, image)
        cuts = [0, *sorted(rng.sample(range(1, SIZE), 7)), SIZE]
        blocks = [f"{a:#010x}  {b - a:#010x}  +" for a, b in itertools.pairwise(cuts)]
        blocks += [f"{SIZE:#x} 0x200 -", f"{SIZE + 512:#x} 0x800 ?"]
        path = tmp_path / "image.map"
        header = f"# Mapfile. Created by GNU ddrescue version 1.27\n{SIZE:#x} - 2\n"
        path.write_text(header + "\n".join(blocks) + "\n")
        node = under_test(start_node, "ddrescue", f"ddrescue-mapfile={path}", upstreams=[up.uri])
        return Target(shape, node, [node, up], image, read_only=True)
    if shape in ("swab-16", "swab-64"):
        bits = int(shape.split("-")[1])
        image = rng.randbytes(SIZE)
        up = memory_with(start_node, image)
        node = under_test(start_node, "swab", f"swab-bits={bits}", upstreams=[up.uri])

        def swab_below(export: bytes, trimmed: bytearray) -> None:
            # Trims are whole words (block_min), so `trimmed` needs no swapping.
            bad = differ(swap_words(read_all(up.uri), bits), export, trimmed)
            check(bad is None, f"{shape}: the upstream, swapped, differs at {bad}")

        return Target(shape, node, [node, up], swap_words(image, bits), check_below=swab_below)
    # Filters over a memory disk of random data.
    image = rng.randbytes(SIZE)
    up = memory_with(start_node, image)
    extras: dict[str, Any] = {}
    procs = [up]
    upstream = up.uri
    if shape in ("error", "retry", "retry-request"):
        before, after = trigger(tmp_path / f"{shape}.trigger")
        extras.update(injects=True, before_batch=before, after_batch=after)
        rate = "5%" if shape == "error" else "20%"
        err = start_node(
            "error",
            f"error-rate={rate}",
            f"error-file={tmp_path / f'{shape}.trigger'}",
            f"seed={seed}",
            upstreams=[up.uri],
        )
        procs.insert(0, err)
        upstream = err.uri
    args: list[str] = {
        "readahead": ["readahead-min=4K", "readahead-max=128K"],
        "delay": ["delay-read=1ms", "wdelay=1ms", "delay-extents=1ms", "delay-flush=2ms"],
        "rate": ["rate=96M", "connection-rate=48M", "burstiness=0.5"],
        "log": [f"logfile={tmp_path / 'log.jsonl'}"],
        "stats": [f"statsfile={tmp_path / 'stats.json'}", "statsformat=json"],
        "nocache": ["cachemode=emulate"],
        "nocache-none": [],
        "noextents": [],
        "nozero": ["zeromode=emulate"],
        "nozero-none": [],
        "fua": ["fuamode=emulate"],
        "cow-on-read": ["cow-block-size=4K", "cow-on-read=true"],
        "blocksize-512": ["minblock=512", "maxdata=1K", "maxlen=4K"],
        "blocksize-64k": ["minblock=64K", "maxdata=128K", "maxlen=256K"],
        "error": [],
        "retry": ["retries=4", "retry-delay=1ms", "retry-exponential=no"],
        "retry-request": ["retry-request-retries=4", "retry-request-delay=1ms"],
        "scan": ["scan-size=64K", "scan-forever=true"],
        # The maximum at least the 4M pieces fill() and read_all() use.
        "blocksize-policy-error": [
            "blocksize-minimum=512",
            "blocksize-maximum=4M",
            "blocksize-error-policy=error",
        ],
        "blocksize-policy-allow": ["blocksize-minimum=512", "blocksize-preferred=64K"],
        "nbd": [],
        "nbd-libnbd": ["relay=false"],
        "nbd-polling": [],
        "nofilter": [],
        # The fuzz clients and libnbd connect over a unix socket, as this process's user.
        "ip": [f"allow=uid:{os.getuid()}", "deny=all"],
    }[shape]
    kinds = {"cow-on-read": "cow", "retry-request": "retry-request",
             "blocksize-policy-error": "blocksize-policy",
             "blocksize-policy-allow": "blocksize-policy"}  # fmt: skip
    kind = kinds.get(shape, shape.split("-")[0])
    # nbd-polling: the relay with --poll-max-us (its upstream socket watched by the poller).
    extra = ("--poll-max-us", "100") if shape == "nbd-polling" else ()
    node = under_test(start_node, kind, *args, upstreams=[upstream], extra=extra)
    below = same_below(shape, up.uri)
    if shape == "cow-on-read":

        def cow_below(export: bytes, trimmed: bytearray) -> None:
            check(read_all(up.uri) == image, "cow wrote to its upstream")

        below = cow_below
    if shape == "nozero":
        extras["fast_zero_fails"] = True
    if shape == "noextents":
        extras["all_data"] = True
    if shape == "log":
        extras["after_stop"] = lambda: check_log(tmp_path / "log.jsonl")
    if shape == "stats":
        extras["after_stop"] = lambda: check_stats(tmp_path / "stats.json")
    return Target(shape, node, [node, *procs], image, check_below=below, **extras)


def tmpdisk_shape(start_node: Any, tmp_path: Path, rng: random.Random) -> Target:
    """tmpdisk: each connection a fresh copy of a random image (its command= copies it, as
    nbdkit's manual shows), whatever name it asks for: no client sees another's writes, and
    no disk outlives its connection (after each batch the node holds none; after the run its
    TMPDIR is empty)."""
    image = lumpy(rng, SIZE)
    base, temp = tmp_path / "base.img", tmp_path / "tmp"
    base.write_bytes(image)
    temp.mkdir()
    copy = 'command=cp --sparse=always "$base" "$disk"'
    node = under_test(start_node, "tmpdisk", "size=0", f"base={base}", copy,
                      env={"TMPDIR": str(temp)})  # fmt: skip

    def export_of(name: bytes) -> bytes | None:
        return image if is_nbd_string(name) else None

    def no_disk_held() -> None:
        held = []
        for fd in Path(f"/proc/{node.pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd).startswith(f"{temp}/"):
                    held.append(os.readlink(fd))
        check(not held, f"no client is connected, yet the node holds disks: {held}")

    def temp_empty() -> None:
        left = sorted(p.name for p in temp.iterdir())
        check(not left, f"tmpdisk left {left} in its TMPDIR")

    # Every name is the client's disk, but for what is no NBD string (so clients try names).
    refused = [b"x" * 4097, b"\xff\xfe", b"a\0", b"\xc3", b"\xed\xa0\x80"]
    return Target("tmpdisk", node, [node], image, exports={b"": image}, export_of=export_of,
                  private=True, multi_conn=False, refused=refused, when_idle=no_disk_held,
                  after_stop=temp_empty)  # fmt: skip


def ondemand_shape(start_node: Any, tmp_path: Path, rng: random.Random) -> Target:
    """ondemand over a directory with three exports in it ("" is `default`): a new name is a
    new blank disk (its command= truncates), made once and kept (a mutated GO may write to
    one); names with ".", ":" or "/" or over 255 bytes are refused; clients take turns at an
    export (wait=true). The files hold what the exports serve; no half-made disk is left."""
    folder = tmp_path / "exports"
    folder.mkdir()
    files = {b"default": lumpy(rng, 64 * KiB), b"a": rng.randbytes(SIZE),
             b"b": lumpy(rng, 256 * KiB + 4096)}  # fmt: skip
    for name, image in files.items():
        (folder / name.decode()).write_bytes(image)
    new = 'command=truncate -s $size "$disk"'
    node = under_test(start_node, "ondemand", str(SIZE), f"dir={folder}", "wait=true", new)

    def export_of(name: bytes) -> bytes | None:
        if not is_nbd_string(name):
            return None
        text = name.decode()
        if any(c in text for c in "./:") or len(name) > 255:
            return None
        return files.get(name or b"default", bytes(SIZE))

    def file_below(name: bytes, export: bytes, trimmed: bytearray) -> None:
        bad = differ((folder / (name or b"default").decode()).read_bytes(), export, trimmed)
        check(bad is None, f"file {name!r} differs from its export at {bad}")

    def no_folder_left() -> None:
        left = [p.name for p in folder.iterdir() if p.name.startswith(".")]
        check(not left, f"ondemand left {left} in its directory")

    refused = [b"a.b", b".", b"..", b"x:y", b"a/b", b"/a", b"n" * 256, b"\xff\xfe", b"a\0"]
    return Target("ondemand", node, [node], b"", exports=files, aliases={b"": b"default"},
                  export_of=export_of, persistent=True, multi_conn=False, refused=refused,
                  check_named=file_below, after_stop=no_folder_left)  # fmt: skip


def info_shape(shape: str, start_node: Any, rng: random.Random) -> Target:
    """The info plugin: a read-only disk about the client. Its name, an address or a clock,
    so every name the client asks for leads to an export (some refused in base64 mode)."""
    mode = shape.partition("-")[2] or "exportname"
    spawned = time.monotonic()
    node = under_test(start_node, "info", f"mode={mode}")
    ready = time.monotonic()
    names = [b"", b"hello", "ünïcode name".encode(), rng.randbytes(1500).hex().encode()]
    export_of: Callable[[bytes], bytes | None] = utf8_name
    volatile = None
    if mode == "base64exportname":
        names = [b""] + [base64.b64encode(rng.randbytes(n)) for n in (1, 5, 2000)]
        export_of = base64_name
    elif mode == "address":
        export_of = unix_address
    elif mode != "exportname":
        export_of = a_clock
        volatile = clock(mode, spawned, ready, time.time())
    exports = {name: export_of(name) or b"" for name in names[: 1 if volatile else None]}
    return Target(
        shape,
        node,
        [node],
        b"",
        read_only=True,
        exports=exports,
        export_of=export_of,
        volatile=volatile,
    )


#: Names an exportname node over a directory refuses, whatever its params: none of the files
#: (nor out of the directory, nor another of them by a URI's quoting or query, were a name put
#: in the upstream's URI as it is), the longest NBD strings, and what is no NBD string.
EXPORTNAME_REFUSED = [
    b"zz",
    b"sub",
    b".",
    b"..",
    b"../disks/a.img",
    b"/a.img",
    b"a.img/",
    b"A.IMG",
    b" a.img",
    b"a.img\n",
    b"%61.img",
    b"a.img?socket=/nowhere",
    b"a.img#",
    "\u00e9?xA#.img".encode(),
    b"x" * 4096,
    "\u00e9".encode() * 2048,
    b"x" * 4097,
    b"\xff\xfe",
    b"a.img\0",
    b"\xc3",
    b"\xed\xa0\x80",
]


def exportname_shape(shape: str, start_node: Any, tmp_path: Path, rng: random.Random) -> Target:
    """The exportname filter over a directory of files (file dir=): a client's name leads to
    the file of that name, or to default-export's, or is refused, and the list is the
    directory's, the filter's own or refused, as the shape's params say. The files hold what
    the exports hold (a name with characters a URI quotes among them)."""
    folder = tmp_path / "disks"
    folder.mkdir()
    (folder / "sub").mkdir()
    odd = "\u00e9?x%41#.img".encode()
    files = {
        b"a.img": rng.randbytes(SIZE),
        b"b.img": lumpy(rng, 256 * KiB + 4096),
        b"c d.img": bytes(64 * KiB),
        odd: rng.randbytes(8 * KiB),
    }
    if shape == "exportname-many":  # more than it keeps open idle (16): closed and reopened
        files |= {f"n{i:02}.img".encode(): lumpy(rng, 4 * KiB * (i + 1)) for i in range(18)}
    for name, image in files.items():
        (folder / name.decode()).write_bytes(image)
    up = start_node("file", f"dir={folder}")
    upstream, exports, refused = up.uri, dict(files), list(EXPORTNAME_REFUSED)
    listed: list[bytes] | None = sorted(files)
    list_error = 0
    if shape == "exportname":  # the directory's list; "" is b.img
        args, aliases = ["default-export=b.img"], {b"": b"b.img"}

        def describe(name: bytes) -> bytes:
            return b""  # the file plugin's (none)

    elif shape == "exportname-strict":  # only the names given; "" is "c d.img"; zz is not there
        args = ["exportname-list=explicit", "exportname-strict=true", "exportname=",
                "exportname=a.img", "exportname=c d.img", "exportname=zz",
                "default-export=c d.img", "exportdesc=script:printf '<%s>' \"$name\""]  # fmt: skip
        aliases, listed = {b"": b"c d.img"}, [b"", b"a.img", b"c d.img", b"zz"]
        exports = {n: files[n] for n in (b"a.img", b"c d.img")}
        refused += [b"b.img", odd]  # files the filter does not let through

        def describe(name: bytes) -> bytes:
            return b"<" + name + b">"

    else:  # exportname-many: no list; "" is the export the upstream's URI names
        args = ["exportname-list=error", "exportdesc=fixed:one of many"]
        aliases = {b"": b"n05.img"}
        upstream, listed, list_error = up.uri.replace("/?", "/n05.img?"), None, ERR_POLICY

        def describe(name: bytes) -> bytes:
            return b"one of many"

    node = under_test(start_node, "exportname", *args, upstreams=[upstream])

    def file_below(name: bytes, export: bytes, trimmed: bytearray) -> None:
        bad = differ((folder / aliases.get(name, name).decode()).read_bytes(), export, trimmed)
        check(bad is None, f"file {name!r} differs from its export at {bad}")

    return Target(
        shape,
        node,
        [node, up],
        b"",
        exports=exports,
        check_named=file_below,
        aliases=aliases,
        listed=listed,
        list_error=list_error,
        describe=describe,
        refused=refused,
    )


def is_nbd_string(name: bytes) -> bool:
    """Whether `name` may be a string in the protocol: at most 4096 bytes of UTF-8, no NUL."""
    try:
        name.decode()
    except UnicodeDecodeError:
        return False
    return len(name) <= 4096 and b"\0" not in name


def utf8_name(name: bytes) -> bytes | None:
    try:
        name.decode()
    except UnicodeDecodeError:
        return None
    return name


def unix_address(name: bytes) -> bytes:
    """What info mode=address shows a unix-socket client, whatever the name (not the path)."""
    return b"unix"


def a_clock(name: bytes) -> bytes:
    """The size of info's clocks, whatever the name (the bytes are judged by clock())."""
    return bytes(12)


def base64_name(name: bytes) -> bytes | None:
    try:
        return base64.b64decode(name, validate=True)
    except ValueError:  # binascii.Error too
        return None


def clock(
    mode: str, spawned: float, ready: float, wall: float
) -> Callable[[int, bytes, float], str | None]:
    """Judges a read of an info clock: `mode` time (wall clock, from `wall` on), uptime (the
    node was spawned at `spawned` and ready at `ready`) or conntime. Only whole values (all 12
    bytes read at once) can be judged; of a part of one, only its length."""

    def judge(offset: int, data: bytes, connected_at: float) -> str | None:
        if (offset, len(data)) != (0, 12):
            return None
        seconds, micros = struct.unpack(">QI", data)
        if micros >= 1_000_000:
            return f"{micros} microseconds"
        value, now = seconds + micros / 1e6, time.monotonic()
        if mode == "time":
            low, high = wall - 1, time.time() + 1  # the same clock, give or take a step
        elif mode == "uptime":
            low, high = connected_at - ready, now - spawned
        else:  # conntime: counted from the handshake, which came after the connect
            low, high = 0, now - connected_at
        if not low - 0.001 <= value <= high + 0.001:
            return f"{mode} reads {value:.6f} s, not within [{low:.6f}, {high:.6f}]"
        return None

    return judge


def check_log(path: Path) -> None:
    """Every line of the log filter's file is a JSON object; requests were logged, and every
    connection opened was closed."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    events = [line["event"] for line in lines]
    check(events.count("request") > 0, "no request logged")
    check(events.count("open") == events.count("close"), "log: opens and closes differ")
    check(events[-1] == "stop", f"log ends with {events[-1]}")


def check_stats(path: Path) -> None:
    """The stats filter wrote its report at stop, and it counted reads."""
    report = json.loads(path.read_text())
    check(report, "empty stats report")
    check("read" in json.dumps(report), "stats report without reads")


# TLS ------------------------------------------------------------------------------------------


def tls_shape(shape: str, start_node: Any, pki: Path) -> Target:
    """A memory node that serves its clients over TLS (tls-require: only; tls-on: TLS or
    plaintext, and polling before it sleeps, the TLS reader's other path), a plaintext nbd
    filter whose upstream hop is TLS (tls-chain: the upstream side's TLS under load), a
    relaying nbd node that requires TLS of its clients (tls-relay), or a tls-fallback filter
    run with --tls=on over a memory node (tls-fallback: TLS clients are served the disk as
    tls-on's, plaintext ones a read-only notice under any name, and none of their requests may
    reach the disk)."""
    rng = random.Random(f"{SEED}:{shape}:initial")
    image = rng.randbytes(SIZE)
    tls = ("--tls-certificates", str(pki), "--handshake-limit", str(HANDSHAKE_LIMIT))
    if shape == "tls-fallback":
        up = memory_with(start_node, image)
        node = under_test(
            start_node,
            "tls-fallback",
            f"tlsreadme={TLS_README}",
            upstreams=[up.uri],
            extra=("--tls=on", *tls),
        )
        return Target(
            shape, node, [node, up], image, check_below=same_below(shape, up.uri), tls="on",
            pki=pki, tls_contexts=client_contexts(pki),
            plaintext=TLS_README.encode().ljust(512, b"\0"),  # nbdkit's padding: NULs to 512
        )  # fmt: skip
    if shape == "tls-relay":  # a relaying nbd node that requires TLS of its clients
        up = memory_with(start_node, image)
        node = under_test(start_node, "nbd", upstreams=[up.uri], extra=("--tls=require", *tls))
        return Target(
            shape, node, [node, up], image, check_below=same_below(shape, up.uri),
            tls="require", pki=pki, tls_contexts=client_contexts(pki),
        )  # fmt: skip
    if shape == "tls-chain":
        up = start_node("memory", str(SIZE), extra=("--tls=require", *tls))
        secure = f"{up.uri}&tls-certificates={urllib.parse.quote(str(pki))}"
        fill(secure, image)
        node = under_test(
            start_node, "nbd", upstreams=[up.uri], extra=("--upstream-tls-certificates", str(pki))
        )
        return Target(shape, node, [node, up], image, check_below=same_below(shape, secure))
    mode = shape.removeprefix("tls-")
    polling = ("--poll-max-us", "50") if mode == "on" else ()
    node = under_test(start_node, "memory", str(SIZE), extra=(f"--tls={mode}", *tls, *polling))
    target = Target(
        shape, node, [node], image, tls=mode, pki=pki, tls_contexts=client_contexts(pki)
    )
    fill(target.uri(), image)
    return target


def client_contexts(pki: Path) -> list[ssl.SSLContext]:
    """What the fuzz clients connect with: the test CA, and TLS 1.3 (the default) or at most
    TLS 1.2 (the node's other handshake)."""
    contexts = []
    for top in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        context = ssl.create_default_context(cafile=str(pki / "ca-cert.pem"))
        context.maximum_version = top
        contexts.append(context)
    return contexts


def client_hello(context: ssl.SSLContext) -> bytes:
    """The first flight of a TLS handshake with `context` (a ClientHello), to be mangled."""
    outgoing = ssl.MemoryBIO()
    obj = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


#: tls-fallback's tlsreadme=: what its plaintext clients read (UTF-8, under 512 bytes).
TLS_README = "Plaintext clients read only this notice \u2014 start TLS for the disk.\n"
#: The names a plaintext session on it asks for: each leads to the notice.
PLAINTEXT_NAMES = [b"", b"disk", "\u00e9t\u00e9".encode(), b"../etc/passwd", b"x" * 4096]

#: How the clients of a TLS node begin (weights); ONLY_WITH: ways for one --tls mode.
TLS_WAYS = {
    "starttls": 50,
    "refused-first": 10,
    "plain-first": 10,
    "export-name-first": 3,
    "abort-first": 2,
    "starttls-payload": 5,
    "starttls-twice": 5,
    "inject": 5,
    "bad-hello": 8,
    "stall": 4,
    "hang-up": 3,
}
ONLY_WITH = {"refused-first": "require", "export-name-first": "require", "plain-first": "on"}


def flipped(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


class TLSLink:
    """The client's end of TLS on its connection: an ssl.SSLObject over memory BIOs, driven by
    hand (asyncio's own TLS transport cannot half-close, nor send a corrupt record). It has the
    parts of StreamReader and StreamWriter the client uses: once the handshake is done it
    stands in for both, over the raw reader and writer."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        context: ssl.SSLContext,
        rng: random.Random,
    ) -> None:
        self.raw_reader, self.raw_writer = reader, writer
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.plain = bytearray()  #: decrypted, not yet read
        self.rng = rng

    @property
    def transport(self) -> asyncio.WriteTransport:
        return self.raw_writer.transport

    async def handshake(self) -> None:
        """The TLS handshake; a TLS error (the node's alert too) is a ConnectionError."""
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._pump_in():
                    raise ConnectionResetError("the server closed in the TLS handshake") from None
            except ssl.SSLError as exc:
                raise ConnectionResetError(f"TLS handshake: {exc}") from None
        await self._flush()

    @property
    def version(self) -> str:
        return self.obj.version() or ""

    async def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.raw_writer.write(data)
            await self.raw_writer.drain()

    async def _pump_in(self) -> bool:
        data = await self.raw_reader.read(1 << 16)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()
        return bool(data)

    async def _more(self) -> bool:
        """Decrypt more into `plain`; False at the end of the server's stream (its close_notify,
        or the socket's end without one)."""
        while True:
            try:
                data = self.obj.read(1 << 17)
            except ssl.SSLWantReadError:
                await self._pump_in()
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return False
            except ssl.SSLError as exc:  # a record that does not decrypt, an alert
                raise ConnectionResetError(f"TLS: {exc}") from None
            if not data:
                return False
            self.plain += data
            return True

    async def readexactly(self, n: int) -> bytes:
        while len(self.plain) < n:
            if not await self._more():
                partial = bytes(self.plain)
                self.plain.clear()
                raise asyncio.IncompleteReadError(partial, n)
        data = bytes(self.plain[:n])
        del self.plain[:n]
        return data

    async def read(self, n: int) -> bytes:
        if not self.plain and not await self._more():
            return b""
        data = bytes(self.plain[:n])
        del self.plain[:n]
        return data

    def write(self, data: bytes) -> None:
        try:
            self.obj.write(data)
        except ssl.SSLError as exc:
            raise ConnectionResetError(f"TLS: {exc}") from None
        self.raw_writer.write(self.outgoing.read())

    async def drain(self) -> None:
        await self.raw_writer.drain()

    def write_eof(self) -> None:
        """The end of what we send. TLS 1.3: close_notify, which closes only our side (RFC 8446
        6.1), maybe with the socket's end too, or the socket's end alone (a truncated stream).
        Over TLS 1.2 a close_notify lets the node drop what it still had to send (RFC 5246
        7.2.1): there only the socket's end, after which replies still due must come, as in
        plaintext."""
        how = self.rng.choice(["close_notify", "both", "ragged"])
        if self.version != "TLSv1.3":
            how = "ragged"
        if how != "ragged":
            self._decrypt_pending()
            try:
                self.obj.unwrap()
            except ssl.SSLWantReadError:
                pass  # the server's close_notify comes later
            except ssl.SSLError as exc:
                raise ConnectionResetError(f"TLS: {exc}") from None
            self.raw_writer.write(self.outgoing.read())
        if how != "close_notify":
            self.raw_writer.write_eof()

    def _decrypt_pending(self) -> None:
        """Decrypt what has come in: unwrap() reads on after sending close_notify, and its
        OpenSSL fails the session on application data it finds there (replies still coming)."""
        while self.incoming.pending:
            try:
                self.plain += self.obj.read(1 << 17)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return
            except ssl.SSLError as exc:
                raise ConnectionResetError(f"TLS: {exc}") from None

    def write_corrupt(self, data: bytes) -> None:
        """`data` in a record that does not decrypt: one byte of its ciphertext flipped (not
        of its header: a longer length would only make the node wait for more)."""
        self.obj.write(data)
        record = bytearray(self.outgoing.read())
        record[self.rng.randrange(5, len(record))] ^= 1 << self.rng.randrange(8)
        self.raw_writer.write(bytes(record))


# One adversarial client -----------------------------------------------------------------------


@dataclass
class Stats:
    connections: int = 0
    requests: int = 0
    replies: int = 0
    errors: dict[int, int] = field(default_factory=dict)
    endings: dict[str, int] = field(default_factory=dict)
    tls: dict[str, int] = field(default_factory=dict)  #: how the clients of a TLS node began
    #: Lookups of other names (several exports): refused ones per option, INFOs of served ones.
    names: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    #: Clients being served now, and the most at once (see Client.served).
    serving: int = 0
    most_served: int = 0

    def count(self, table: dict[Any, int], key: Any) -> None:
        table[key] = table.get(key, 0) + 1


@dataclass
class Pending:
    cookie: int
    cmd: int
    flags: int
    offset: int
    length: int
    allowed: frozenset[int]
    op: Op
    payload: bytes | None = None
    #: Structured reply state: data chunks (offset, bytes), holes, error, status chunks.
    pieces: list[tuple[int, bytes]] = field(default_factory=list)
    error: int = 0
    statuses: list[tuple[int, list[tuple[int, int]]]] = field(default_factory=list)


@dataclass
class Session:
    """What the handshake settled."""

    size: int = 0
    tflags: int = 0
    structured: bool = False
    meta_ids: tuple[int, ...] = ()
    block_min: int = 1
    block_max: int = 32 * MiB
    block_max_advertised: bool = False


class Closed(Exception):
    """The server closed the connection."""


class Refused(Exception):
    """A full node (limit) turned the client away."""


class Client:
    """A raw-socket NBD client that mixes valid and invalid traffic and judges every reply."""

    def __init__(
        self,
        target: Target,
        models: dict[bytes, Model],
        rng: random.Random,
        stats: Stats,
        tag: str,
    ) -> None:
        self.t = target
        self.models = models
        #: The export this client asks for, and its model.
        self.name = rng.choice(sorted(models)) if len(models) > 1 else b""
        self.model = models[self.name]
        if target.private:
            self.model = target.model(target.initial_of(self.name))
        self.rng = rng
        self.stats = stats
        self.tag = tag
        self.s = Session()
        self.pending: dict[int, Pending] = {}
        self.cookie = rng.randrange(1 << 64)
        self.fatal = ""  #: what we sent that allows the server to hang up on us
        self.disc = False
        self.half_closed = False
        self.closing = False  #: we are hanging up: the end of the stream is ours
        self.secured = False  #: the session runs over TLS
        #: A plaintext session served `target.plaintext`: the export's name and model, kept
        #: for a STARTTLS later on (self.name and self.model are then the stand-in's).
        self.stand_in: tuple[bytes, Model] | None = None
        #: A full node may end the session now (limit): before the greeting, and from the
        #: end of the handshake until the first reply.
        self.refusable = target.refuses
        #: Served: from the first reply until we begin to end the session. The node counts the
        #: client at least that long (from before its first reply until it sees the end).
        self.served = False
        self.ending = False
        self.eof = asyncio.Event()
        #: The raw stream, or once TLS is up, the TLSLink over it (it stands in for both).
        self.reader: asyncio.StreamReader | TLSLink
        self.writer: asyncio.StreamWriter | TLSLink
        self.trace: list[str] = []

    def fail(self, message: str) -> FuzzFailure:
        marks = [t for t in self.trace if t.startswith(("transmission", "finish"))]
        recent = "\n  ".join([*marks, "...", *self.trace[-12:]])
        return FuzzFailure(f"[{self.t.name} {self.tag}] {message}\n  recent:\n  {recent}")

    def expect(self, cond: object, message: str) -> None:
        if not cond:
            raise self.fail(message)

    @property
    def read_only(self) -> bool:
        return self.stand_in is not None or self.t.read_only

    async def run(self) -> None:
        self.connected_at = time.monotonic()
        try:
            self.reader, self.writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.t.node.socket, limit=1 << 26), REPLY_TIMEOUT
            )
        except TimeoutError:
            raise self.fail(f"connecting took over {REPLY_TIMEOUT} s (a hang)") from None
        self.stats.connections += 1
        try:
            await self._run()
        except Refused:
            self.stats.count(self.stats.endings, "refused")
        except Closed:
            if not self.refusable:
                raise self.fail("the server closed the connection unexpectedly") from None
            self.stats.count(self.stats.endings, "refused")
        except ConnectionError as exc:
            if self.refusable:
                self.stats.count(self.stats.endings, "refused")
            elif not self.fatal:
                raise self.fail(f"connection error: {exc!r}") from None
        finally:
            self.unserved()
            self.writer.transport.abort()
            for p in self.pending.values():
                self.model.log(self.tag, f"orphaned {p.cookie:#x}", p.op, p.payload)
                self.model.orphan(p.op)
            self.pending.clear()

    async def recv(self, n: int) -> bytes:
        try:
            return await asyncio.wait_for(self.reader.readexactly(n), REPLY_TIMEOUT)
        except asyncio.IncompleteReadError as exc:
            if exc.partial and not self.closing:
                raise self.fail(
                    f"server closed mid-message ({len(exc.partial)} of {n} bytes)"
                ) from None
            self.trace.append("closed: end of stream")
            raise Closed() from None
        except ConnectionError as exc:
            self.trace.append(f"closed: {exc!r}")
            raise Closed() from None
        except TimeoutError:
            raise self.fail(f"no data from the server for {REPLY_TIMEOUT} s (a hang)") from None

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        try:
            await asyncio.wait_for(self.writer.drain(), REPLY_TIMEOUT)
        except TimeoutError:
            raise self.fail(f"the server took no data for {REPLY_TIMEOUT} s (a hang)") from None

    async def expect_close(self, why: str, quiet: bool = False) -> None:
        """The server must end the connection after `why` (not hang); `quiet`: without a word."""
        while True:
            try:
                data = await asyncio.wait_for(self.reader.read(1 << 16), REPLY_TIMEOUT)
            except ConnectionError:
                return
            except TimeoutError:
                raise self.fail(f"the server did not close the connection after {why}") from None
            if not data:
                return
            self.expect(not quiet, f"the server answered {why}: {data[:40].hex()}")

    # Handshake ------------------------------------------------------------------------------

    async def _run(self) -> None:
        rng = self.rng
        magic, ihaveopt, hflags = struct.unpack(">QQH", await self.recv(18))
        self.refusable = False  # admitted: until it asks for the export
        self.expect((magic, ihaveopt) == (NBDMAGIC, IHAVEOPT), "bad greeting")
        self.expect(hflags & 1 and not hflags & ~3, f"handshake flags {hflags:#x}")
        roll = rng.random()
        if roll < 0.04:
            self.trace.append("bad client flags")
            await self.send(struct.pack(">I", rng.choice([4, 1 << 31, 0xFFFFFFFF])))
            await self.expect_close("unknown client flags")
            self.stats.count(self.stats.endings, "bad-client-flags")
            return
        if roll < 0.10 and SEEDS:
            await self.replay_seed()
            return
        if roll < 0.15:
            cflags = rng.choice([0, 2])  # not fixed newstyle: only EXPORT_NAME
            await self.send(struct.pack(">I", cflags))
            if self.t.tls == "require":
                await self.export_name_before_tls()
                return
            self.without_tls()
            if not await self.export_name(cflags):
                return
        else:
            cflags = rng.choice([1, 3, 3, 3])
            await self.send(struct.pack(">I", cflags))
            if self.t.tls != "off" and not await self.secure():
                return
            if not await self.negotiate(cflags):
                return
        await self.transmission()

    async def replay_seed(self) -> None:
        data = bytearray(self.rng.choice(SEEDS).read_bytes())
        for _ in range(self.rng.randint(0, 4)):
            i = self.rng.randrange(len(data))
            data[i] ^= 1 << self.rng.randrange(8)
        data = data[: self.rng.randint(1, len(data))]
        self.trace.append(f"replay mutated seed {bytes(data).hex()}")
        self.replayed_writes(bytes(data))
        try:
            await self.send(bytes(data))
            self.writer.write_eof()
        except ConnectionError:
            pass
        await self.expect_close("seed replay ended")
        self.stats.count(self.stats.endings, "seed-replay")

    def replayed_writes(self, data: bytes) -> None:
        """A replayed seed is not framed by us: where the node's handshake ends in it, and so
        which of its bytes are requests, is the node's to decide. A bit flip may well make a
        READ of the seed a TRIM, or a payload byte a header. Every request the node can act on
        starts with the request magic, so each header found anywhere in `data` that could
        change the export makes its range unknown, as a write cut off with its connection."""
        if self.t.writes != "store" or self.t.private:  # private: its disk is gone with it
            return
        if self.t.plaintext is not None:  # a replay is plaintext: it must not reach the export
            return
        magic = REQUEST_MAGIC.to_bytes(4, "big")
        at = data.find(magic)
        while 0 <= at <= len(data) - REQUEST.size:
            _, _, cmd, _, offset, length = REQUEST.unpack_from(data, at)
            if cmd in (WRITE, TRIM, ZERO):
                for model in set(self.models.values()):
                    start, end = min(offset, model.size), min(offset + length, model.size)
                    op = Op(cmd, start, end, mutates=True)
                    model.begin(op)
                    model.log(self.tag, "replayed", op)
                    model.orphan(op)
            at = data.find(magic, at + 1)

    # TLS ------------------------------------------------------------------------------------

    async def secure(self) -> bool:
        """On a TLS node, before negotiating: STARTTLS and a TLS handshake (the session goes on
        over TLS), a plaintext session (--tls=on), or one of the ways to get TLS wrong. False:
        the session has ended."""
        rng = self.rng
        if self.t.tls == "on" and rng.random() < 0.4:
            self.stats.count(self.stats.tls, "plaintext")
            self.without_tls()
            return True
        ways = {k: w for k, w in TLS_WAYS.items() if ONLY_WITH.get(k, self.t.tls) == self.t.tls}
        how = rng.choices(list(ways), list(ways.values()))[0]
        self.stats.count(self.stats.tls, how)
        self.trace.append(f"tls: {how}")
        if how == "export-name-first":
            await self.export_name_before_tls()
            return False
        if how == "abort-first":
            await self.abort()
            return False
        if how == "inject":
            return await self.injected_starttls()
        if how == "refused-first":
            await self.refused_before_tls()
        elif how == "plain-first":
            await self.negotiated_before_tls()
        elif how == "starttls-payload":
            await self.option(OPT_STARTTLS, rng.randbytes(rng.randint(1, 64)))
            reps = await self.opt_replies(OPT_STARTTLS)
            self.expect(reps == [(ERR_INVALID, reps[0][1])], f"STARTTLS with data: {reps}")
        await self.option(OPT_STARTTLS, b"")
        reps = await self.opt_replies(OPT_STARTTLS)
        self.expect(reps == [(REP_ACK, b"")], f"STARTTLS: {reps}")
        if how in ("bad-hello", "stall", "hang-up"):
            await self.no_tls(how)
            return False
        await self.tls_handshake()
        if how == "starttls-twice":
            await self.option(OPT_STARTTLS, b"")
            reps = await self.opt_replies(OPT_STARTTLS)
            self.expect(reps == [(ERR_INVALID, reps[0][1])], f"STARTTLS over TLS: {reps}")
        return True

    def without_tls(self) -> None:
        """The session goes on in plaintext: where such a session is served a stand-in
        (tls-fallback), it is judged by a model of the stand-in's bytes, read-only, and asks
        for it by a name of any kind (every name leads there)."""
        if self.t.plaintext is None or self.stand_in is not None:
            return
        self.stand_in = (self.name, self.model)
        self.name = self.rng.choice(PLAINTEXT_NAMES)
        self.model = self.t.model(self.t.plaintext)
        self.stats.count(self.stats.tls, "stand-in")

    async def tls_handshake(self) -> None:
        """After the STARTTLS ACK: the TLS handshake, then the session goes on over TLS."""
        link = TLSLink(self.reader, self.writer, self.rng.choice(self.t.tls_contexts), self.rng)
        try:
            await asyncio.wait_for(link.handshake(), REPLY_TIMEOUT)
        except TimeoutError:
            raise self.fail(f"the TLS handshake took over {REPLY_TIMEOUT} s (a hang)") from None
        self.reader = self.writer = link
        self.secured = True
        if self.stand_in is not None:  # from a plaintext session: the export itself from now on
            self.name, self.model = self.stand_in
            self.stand_in = None
        self.trace.append(f"TLS up: {link.version}")
        self.stats.count(self.stats.tls, link.version)

    async def export_name_before_tls(self) -> None:
        """EXPORT_NAME on a TLS-only node before TLS: it has no error reply, so the node must
        hang up without a word (spec)."""
        await self.option(OPT_EXPORT_NAME, self.name)
        await self.expect_close("EXPORT_NAME before TLS", quiet=True)
        self.stats.count(self.stats.endings, "export-name-before-tls")

    async def refused_before_tls(self) -> None:
        """Options before TLS on a TLS-only node: each gets ERR_TLS_REQD, and the session goes
        on (the node must not hang up)."""
        rng = self.rng
        for _ in range(rng.randint(1, 4)):
            option, data = rng.choice(
                [
                    (OPT_LIST, b""),
                    (OPT_INFO, self.info_data(self.name, [3])),
                    (OPT_GO, self.info_data(self.name, [])),
                    (OPT_SR, b""),
                    (OPT_SET_META, self.meta_data(self.name, [b"base:allocation"])),
                    (OPT_LIST_META, self.meta_data(self.name, [])),
                    (rng.choice([4, 11, 12, 99, 0xFFFFFFFF]), rng.randbytes(rng.randint(0, 64))),
                ]
            )
            await self.option(option, data)
            reps = await self.opt_replies(option)
            self.expect(reps == [(ERR_TLS_REQD, reps[0][1])], f"option {option} before TLS: {reps}")

    async def negotiated_before_tls(self) -> None:
        """Structured replies and a meta context negotiated in plaintext (--tls=on), then
        STARTTLS: TLS must wipe them (spec; nbdkit's CVE-2021-3716). The session over TLS
        starts from nothing, which is what the harness then assumes."""
        await self.option(OPT_SR, b"")
        reps = await self.opt_replies(OPT_SR)
        self.expect(reps == [(REP_ACK, b"")], f"SR: {reps}")
        await self.option(OPT_SET_META, self.meta_data(self.name, [b"base:allocation"]))
        reps = await self.opt_replies(OPT_SET_META)
        self.expect(reps[-1][0] == REP_ACK, f"SET_META: {reps}")

    async def injected_starttls(self) -> bool:
        """STARTTLS with a plaintext option right behind it in the same write, as a man in the
        middle would inject one: it came before TLS, so it must never count as sent over TLS
        (the TLS handshake fails on it, or it is dropped). False: the session has ended."""
        rng = self.rng
        option, data = rng.choice(
            [(OPT_SR, b""), (OPT_LIST, b""), (OPT_INFO, self.info_data(self.name, [])), (99, b"")]
        )
        self.trace.append(f"option {OPT_STARTTLS} and in plaintext behind it option {option}")
        starttls = struct.pack(">QII", IHAVEOPT, OPT_STARTTLS, 0)
        await self.send(starttls + struct.pack(">QII", IHAVEOPT, option, len(data)) + data)
        self.fatal = "injected plaintext"  # the node may refuse the TLS that follows
        try:
            reps = await self.opt_replies(OPT_STARTTLS)
        except Closed:
            return False  # refused outright: fine
        self.expect(reps == [(REP_ACK, b"")], f"STARTTLS: {reps}")
        try:
            await self.tls_handshake()
        except ConnectionError:
            return False
        self.fatal = ""
        await self.option(OPT_LIST, b"")
        _, opt, rep, length = struct.unpack(">QIII", await self.recv(20))
        self.expect(
            opt == OPT_LIST,
            f"over TLS the node answered option {opt}, sent in plaintext before the handshake",
        )
        await self.recv(length)
        if rep == REP_SERVER:
            rep = (await self.opt_replies(OPT_LIST))[-1][0]
        self.expect(rep == REP_ACK, f"LIST: {rep:#x}")
        return True

    async def no_tls(self, how: str) -> None:
        """After the STARTTLS ACK, anything but a TLS handshake that ends: the node must close
        the connection (a TLS error, the end of the stream, or its handshake limit), never
        serve it. A hang-up does not wait for that."""
        rng = self.rng
        self.fatal = how
        context = rng.choice(self.t.tls_contexts)
        hello = client_hello(context)
        kind = how
        if how == "bad-hello":
            kind = rng.choice(["garbage", "flipped", "cut", "plain-option", "not-a-hello"])
            data = {
                "garbage": rng.randbytes(rng.randint(1, 600)),
                "flipped": flipped(hello, rng),
                "cut": hello[: rng.randrange(1, len(hello))],
                "plain-option": struct.pack(">QII", IHAVEOPT, OPT_GO, 6) + bytes(6),
                # An application-data record before any handshake.
                "not-a-hello": b"\x17\x03\x03\x00\x20" + rng.randbytes(32),
            }[kind]
        elif how == "stall":
            kind = rng.choice(["nothing", "part-hello", "silent-over-tls"])
            data = hello[: rng.randrange(1, len(hello))] if kind == "part-hello" else b""
        else:  # a hang-up in the middle of the ClientHello
            data = hello[: rng.randrange(len(hello))]
        self.trace.append(f"no TLS: {kind} {data[:40].hex()}")
        if kind == "silent-over-tls":
            await self.tls_handshake()  # and then not a word
        elif data:
            await self.send(data)
        if how == "hang-up" or (how == "stall" and rng.random() < 0.6):
            await asyncio.sleep(rng.choice([0, 0.001, 0.05]))
            return  # run() hangs up
        if how == "bad-hello" and rng.random() < 0.5:
            self.writer.write_eof()
        # A stalled client is closed at the node's handshake limit.
        await self.expect_close(f"the STARTTLS ACK ({kind})")
        self.stats.count(self.stats.endings, f"tls-{kind}")

    async def option(self, option: int, data: bytes) -> None:
        self.trace.append(f"option {option} {data[:40].hex()}")
        await self.send(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)

    async def opt_replies(self, option: int) -> list[tuple[int, bytes]]:
        replies = []
        while True:
            magic, opt, rep, length = struct.unpack(">QIII", await self.recv(20))
            self.expect(magic == OPT_REPLY_MAGIC, f"option reply magic {magic:#x}")
            self.expect(opt == option, f"reply to option {opt}, expected {option}")
            self.expect(length <= 64 * KiB, f"option reply of {length} bytes")
            body = await self.recv(length)
            replies.append((rep, body))
            if rep == ERR_UNKNOWN and self.t.refuses and option in LOOKUPS:
                self.trace.append(f"refused: option {option}")
                raise Refused()  # the export, while the node is full
            if rep == REP_ACK or rep & REP_ERR:
                if rep & REP_ERR:
                    self.expect(len(body) <= 4096, "error message over 4096 bytes")
                return replies
            self.expect(rep in (REP_SERVER, REP_INFO, REP_META), f"reply type {rep:#x}")

    def info_data(self, name: bytes, infos: list[int]) -> bytes:
        return (
            struct.pack(">I", len(name))
            + name
            + struct.pack(f">H{len(infos)}H", len(infos), *infos)
        )

    def meta_data(self, name: bytes, queries: list[bytes]) -> bytes:
        body = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
        return body + b"".join(struct.pack(">I", len(q)) + q for q in queries)

    def check_info(
        self, replies: list[tuple[int, bytes]], structured: bool, asked: Sequence[int] = ()
    ) -> Session | None:
        """The INFO replies of a successful INFO or GO (that `asked` for these): returns what
        they say."""
        s = Session(structured=structured)
        seen_export = False
        # Named exports: the canonical name is the one the client's name leads to.
        canonical = self.t.aliases.get(self.name, self.name)
        described = self.t.describe(canonical) if self.t.describe is not None else b""
        for rep, body in replies[:-1]:
            self.expect(rep == REP_INFO, f"reply {rep:#x} in INFO/GO")
            self.expect(len(body) >= 2, "short INFO reply")
            (kind,) = struct.unpack(">H", body[:2])
            if kind == INFO_EXPORT:
                self.expect(len(body) == 12, "INFO_EXPORT length")
                s.size, s.tflags = struct.unpack(">QH", body[2:])
                seen_export = True
            elif kind == INFO_BLOCK_SIZE:
                self.expect(len(body) == 14, "INFO_BLOCK_SIZE length")
                lo, pref, hi = struct.unpack(">III", body[2:])
                self.expect(lo and lo & (lo - 1) == 0 and lo <= 64 * KiB, f"min block {lo}")
                self.expect(pref >= lo and pref & (pref - 1) == 0, f"preferred block {pref}")
                self.expect(hi == 0xFFFFFFFF or (hi >= pref and hi % lo == 0), f"max {hi}")
                s.block_min, s.block_max, s.block_max_advertised = lo, hi, True
            elif kind == INFO_NAME and (
                self.stand_in is not None
                or (self.t.exports is not None and self.t.export_of is None)
            ):
                self.expect(
                    body[2:] == canonical,
                    f"INFO_NAME {body[2:]!r} for {self.name!r}: {canonical!r}",
                )
            elif kind == INFO_DESCRIPTION and self.stand_in is not None:
                raise self.fail(f"INFO_DESCRIPTION {body[2:]!r} of the plaintext stand-in")
            elif kind == INFO_DESCRIPTION and self.t.describe is not None:
                self.expect(
                    body[2:] == described, f"INFO_DESCRIPTION {body[2:]!r} of {canonical!r}"
                )
                described = b""  # seen
        if replies[-1][0] != REP_ACK:
            return None
        self.expect(seen_export, "INFO/GO succeeded without INFO_EXPORT")
        self.expect(
            INFO_DESCRIPTION not in asked or not described, f"no INFO_DESCRIPTION of {canonical!r}"
        )
        self.check_export(s.size, s.tflags, structured)
        return s

    def check_export(self, size: int, tflags: int, structured: bool) -> None:
        want = self.model.size
        self.expect(size == want, f"export {self.name!r}: size {size}, expected {want}")
        self.expect(tflags & T_HAS_FLAGS, "HAS_FLAGS clear")
        self.expect(bool(tflags & T_READ_ONLY) == self.read_only, f"tflags {tflags:#x}: RO")
        if self.stand_in is not None:
            # A read-only disk and nothing more (nbdkit 1.32's notice: no flush, trim, zero,
            # FUA, cache nor multi-conn).
            want = T_HAS_FLAGS | T_READ_ONLY | (T_DF if structured else 0)
            self.expect(tflags == want, f"the stand-in's tflags {tflags:#x}, expected {want:#x}")
        self.expect(structured or not tflags & T_DF, "SEND_DF without structured replies")
        self.expect(not tflags & T_FAST_ZERO or tflags & T_ZERO, "FAST_ZERO without ZERO")
        self.expect(not tflags & ~0x0DFF, f"unknown transmission flags {tflags:#x}")
        if self.t.multi_conn is not None:
            multi_conn = bool(tflags & T_MULTI_CONN)
            self.expect(multi_conn == self.t.multi_conn, f"tflags {tflags:#x}: CAN_MULTI_CONN")

    async def export_name(self, cflags: int) -> bool:
        if self.t.refused and self.rng.random() < 0.3:
            # No error reply to EXPORT_NAME: a name the node refuses ends the session.
            name = self.rng.choice(self.t.refused)
            await self.option(OPT_EXPORT_NAME, name)
            await self.expect_close(f"EXPORT_NAME {name[:40]!r}", quiet=True)
            self.stats.count(self.stats.endings, "export-name-refused")
            self.stats.count(self.stats.names, "export-name")
            return False
        await self.option(OPT_EXPORT_NAME, self.name)
        self.refusable = self.t.refuses  # no error reply: a full node hangs up
        size, tflags = struct.unpack(">QH", await self.recv(10))
        if not cflags & 2:
            self.expect(await self.recv(124) == bytes(124), "padding is not zeros")
        self.check_export(size, tflags, self.s.structured)
        self.s.size, self.s.tflags = size, tflags
        self.s.block_min, self.s.block_max = self.t.block_min, self.t.block_max
        return True

    async def negotiate(self, cflags: int) -> bool:
        rng = self.rng
        structured = False
        meta: tuple[bytes, tuple[int, ...]] | None = None  # (name, ids) of the last SET
        info: Session | None = None  #: what an INFO right before GO said
        #: A client that tries names (exportname): many lookups, served and refused ones.
        tries_names = bool(self.t.refused) and rng.random() < 0.5
        for _ in range(rng.randint(0, 16 if tries_names else 6)):
            info = None
            if tries_names and rng.random() < 0.5:
                infos = rng.sample([0, 1, 2, 3, 999], rng.randint(0, 3))
                if rng.random() < 0.3:
                    await self.info_of(rng.choice(sorted(self.models)), infos, structured)
                elif await self.other_name(infos, structured):
                    meta = None
                continue
            choice = rng.random()
            if choice < 0.25:
                await self.option(OPT_SR, b"")
                reps = await self.opt_replies(OPT_SR)
                if structured:
                    self.expect(reps[-1][0] in (REP_ACK, ERR_INVALID), "second SR")
                else:
                    self.expect(reps == [(REP_ACK, b"")], f"SR: {reps}")
                structured = True
            elif choice < 0.45:
                queries = [b"base:allocation"] if rng.random() < 0.8 else []
                if rng.random() < 0.3:
                    queries.append(rng.choice([b"qemu:dirty-bitmap:x", b"nope:", b"base:"]))
                rng.shuffle(queries)
                name = self.name if rng.random() < 0.9 else b"other"
                await self.option(OPT_SET_META, self.meta_data(name, queries))
                reps = await self.opt_replies(OPT_SET_META)
                if (
                    structured
                    and name not in self.models
                    and self.stand_in is None
                    and reps[-1][0] == ERR_UNKNOWN
                ):
                    meta = None  # several exports: an unknown name may be refused
                    continue
                ids = self.check_meta(reps, structured, set_=True)
                if structured:
                    self.expect(reps[-1][0] == REP_ACK, f"SET_META failed: {reps[-1]}")
                    want = 1 if b"base:allocation" in queries else 0
                    self.expect(len(ids) == want, f"SET_META selected {ids} for {queries}")
                meta = (name, ids) if reps[-1][0] == REP_ACK else None
            elif choice < 0.55:
                await self.option(OPT_LIST_META, self.meta_data(self.name, [b"base:"]))
                reps = await self.opt_replies(OPT_LIST_META)
                self.check_meta(reps, structured, set_=False)
            elif choice < 0.65:
                infos = rng.sample([0, 1, 2, 3, 999], rng.randint(0, 3))
                if self.t.exports is not None and rng.random() < 0.3:
                    if await self.other_name(infos, structured):
                        meta = None
                    continue
                await self.option(OPT_INFO, self.info_data(self.name, infos))
                reps = await self.opt_replies(OPT_INFO)
                self.expect(reps[-1][0] == REP_ACK, f"INFO failed: {reps[-1]}")
                info = self.check_info(reps, structured, infos)
            elif choice < 0.72:
                await self.option(OPT_LIST, b"")
                self.check_list(await self.opt_replies(OPT_LIST))
            elif choice < 0.80:
                option = rng.choice([4, 11, 12, 99, 0x7FFFFFFF, 0xFFFFFFFF])
                await self.option(option, rng.randbytes(rng.randint(0, 64)))
                reps = await self.opt_replies(option)
                self.expect(
                    reps == [(reps[0][0], reps[0][1])] and reps[0][0] & REP_ERR,
                    f"unknown option {option}: {reps}",
                )
            else:
                outcome = await self.corrupted_option(structured, meta)
                if outcome == "closed":
                    return False
                if isinstance(outcome, tuple):
                    structured, meta = outcome
        end = rng.random()
        if end < 0.05:
            await self.abort()
            return False
        if end < 0.08:
            self.stats.count(self.stats.endings, "close-in-handshake")
            return False
        self.s.structured = structured
        if end < 0.20:
            self.s.meta_ids = meta[1] if meta and meta[0] == self.name else ()
            return await self.export_name(cflags)
        infos = rng.sample([1, 2, 3], rng.randint(0, 3))
        await self.option(OPT_GO, self.info_data(self.name, infos))
        reps = await self.opt_replies(OPT_GO)
        self.expect(reps[-1][0] == REP_ACK, f"GO failed: {reps[-1]}")
        s = self.check_info(reps, structured, infos)
        assert s is not None
        if info is not None:
            self.expect((info.size, info.tflags) == (s.size, s.tflags), "INFO and GO disagree")
        s.meta_ids = meta[1] if meta and meta[0] == self.name else ()
        if not s.block_max_advertised:
            s.block_min, s.block_max = self.t.block_min, self.t.block_max
        self.s = s
        return True

    async def abort(self) -> None:
        await self.option(OPT_ABORT, b"")
        try:
            reps = await self.opt_replies(OPT_ABORT)
            self.expect(reps == [(REP_ACK, b"")], f"ABORT: {reps}")
        except Closed:
            pass  # the client must tolerate the server just closing
        await self.expect_close("abort")
        self.stats.count(self.stats.endings, "abort")

    def bind(self, name: bytes) -> None:
        """A (mutated) name the server accepted: with several exports, it must be one of them
        (and then its model is the one that judges)."""
        if self.stand_in is not None:  # every name leads to the stand-in
            self.name = name
            return
        if self.t.exports is None:
            return
        if self.t.export_of is not None:
            content = self.t.export_of(name)
            self.expect(content is not None, f"export {name!r} accepted, it must be refused")
            assert content is not None
            if self.t.private:  # every name is this connection's own disk
                self.name = name
                return
            # A name of its own (not read back by libnbd): read-only, so its model stays right;
            # or kept as one more export (persistent).
            model = self.models.get(name) or self.t.model(content)
            if self.t.persistent:
                model = self.models.setdefault(name, model)
            self.name, self.model = name, model
            return
        self.expect(name in self.models, f"export {name!r} accepted, not one of the exports")
        self.name, self.model = name, self.models[name]

    async def other_name(self, infos: list[int], structured: bool) -> bool:
        """INFO for a name that is none of the exports (or GO, or a meta context option, where
        every such name is refused): refused with an option error (nor may it lead out of a
        directory), and the handshake goes on; where every name leads somewhere (info), INFO
        must describe what that name leads to. True: it was a SET_META, whose failure leaves no
        meta context selected."""
        rng = self.rng
        names = [b"", b".", b"..", b"../x", b"sub", b"sub/x", b"nope"]
        names = [n for n in names if n not in self.models] + self.t.refused
        if self.t.export_of is not None:
            names += [b"Zm9vYg==", b"Zm9", b"not base64!", "\u00e9t\u00e9".encode(), b"x" * 4000]
        name = rng.choice(names)
        options = [OPT_INFO]
        if self.t.export_of is None:
            options += [OPT_GO, OPT_GO, OPT_SET_META, OPT_LIST_META]
        option = rng.choice(options)
        meta = option in (OPT_SET_META, OPT_LIST_META)
        data = self.meta_data(name, [b"base:allocation"]) if meta else self.info_data(name, infos)
        await self.option(option, data)
        reps = await self.opt_replies(option)
        if self.t.export_of is None or self.t.export_of(name) is None:
            # A meta context option before SR is invalid whatever the name.
            fine = is_nbd_string(name) and (structured or not meta)
            error = ERR_UNKNOWN if fine else ERR_INVALID
            self.expect(reps == [(error, reps[0][1])], f"option {option} {name[:40]!r}: {reps}")
            self.stats.count(self.stats.names, {OPT_INFO: "info", OPT_GO: "go"}.get(option, "meta"))
            return option == OPT_SET_META
        self.expect(reps[-1][0] == REP_ACK, f"INFO {name!r} refused: {reps[-1]}")
        mine = self.name
        self.bind(name)  # only to judge the size
        self.check_info(reps, structured)
        self.bind(mine)
        return False

    async def info_of(self, name: bytes, infos: list[int], structured: bool) -> None:
        """INFO for another of the exports (or a name that leads to one): what it says is that
        export's (size, canonical name, description)."""
        await self.option(OPT_INFO, self.info_data(name, infos))
        reps = await self.opt_replies(OPT_INFO)
        self.expect(reps[-1][0] == REP_ACK, f"INFO {name!r} failed: {reps[-1]}")
        mine = self.name
        self.bind(name)
        self.check_info(reps, structured, infos)
        self.bind(mine)
        self.stats.count(self.stats.names, "info-served")

    def check_list(self, reps: list[tuple[int, bytes]]) -> None:
        t = self.t
        if t.list_error:
            self.expect(reps == [(t.list_error, reps[0][1])], f"LIST: {reps}")
            return
        if self.stand_in is not None:
            # One export, the default one, with no description (nbdkit 1.32's answer here).
            self.expect(reps == [(REP_SERVER, bytes(4)), (REP_ACK, b"")], f"LIST: {reps}")
            return
        self.expect(
            reps[-1][0] == REP_ACK and all(r == REP_SERVER for r, _ in reps[:-1]), f"LIST: {reps}"
        )
        if t.exports is None:
            return
        entries = [self.listed_entry(body) for _, body in reps[:-1]]
        listed = sorted(name for name, _ in entries)
        if t.export_of is not None:
            bad = [n for n in listed if t.export_of(n) is None]
            self.expect(not bad, f"LIST gave names it refuses: {bad}")
        else:
            want = sorted(t.listed if t.listed is not None else self.models)
            self.expect(listed == want, f"LIST gave {listed}, expected {want}")
        if t.describe is not None:
            wrong = [(n, d) for n, d in entries if d != t.describe(n)]
            self.expect(not wrong, f"LIST gave descriptions {wrong}")

    def listed_entry(self, body: bytes) -> tuple[bytes, bytes]:
        """A REP_SERVER's name and description."""
        self.expect(len(body) >= 4, "short REP_SERVER")
        (n,) = struct.unpack(">I", body[:4])
        self.expect(4 + n <= len(body), "REP_SERVER name past its reply")
        return body[4 : 4 + n], body[4 + n :]

    def check_meta(
        self, reps: list[tuple[int, bytes]], structured: bool, set_: bool
    ) -> tuple[int, ...]:
        if not structured:
            self.expect(reps[-1][0] == ERR_INVALID, f"meta context before SR: {reps}")
            return ()
        ids = []
        for rep, body in reps[:-1]:
            self.expect(rep == REP_META and len(body) >= 4, f"meta reply {rep:#x}")
            (cid,) = struct.unpack(">I", body[:4])
            self.expect(body[4:] == b"base:allocation", f"context {body[4:]!r}")
            if set_:
                ids.append(cid)
        return tuple(ids)

    async def corrupted_option(
        self, structured: bool, meta: tuple[bytes, tuple[int, ...]] | None
    ) -> str | tuple[bool, tuple[bytes, tuple[int, ...]] | None] | None:
        """An option from the corpus (or one we know), mutated but framed right: a well-formed
        answer must come back, and the handshake goes on."""
        rng = self.rng
        base = rng.choice(
            [
                (OPT_INFO, self.info_data(self.name, [3])),
                (OPT_SET_META, self.meta_data(self.name, [b"base:allocation"])),
                (OPT_LIST_META, self.meta_data(self.name, [b"base:"])),
                (OPT_GO, self.info_data(self.name, [])),  # b"" as in the corpus seeds
                (OPT_LIST, b""),
                (OPT_SR, b""),
                (OPT_STARTTLS, b""),
            ]
        )
        option, data = base[0], bytearray(base[1])
        kind = rng.choice(["flip", "cut", "grow", "lengths"])
        if kind == "flip" and data:
            for _ in range(rng.randint(1, 3)):
                i = rng.randrange(len(data))
                data[i] ^= 1 << rng.randrange(8)
        elif kind == "cut" and data:
            data = data[: rng.randrange(len(data))]
        elif kind == "grow":
            data += rng.randbytes(rng.randint(1, 16))
        elif kind == "lengths" and len(data) >= 4:
            struct.pack_into(">I", data, 0, rng.choice([1, 7, 4097, 0xFFFFFFFF]))
        option_go_as_info = option == OPT_GO and rng.random() < 0.5
        if option_go_as_info:
            option = OPT_INFO
        await self.option(option, bytes(data))
        reps = await self.opt_replies(option)
        final = reps[-1][0]
        self.expect(final == REP_ACK or final & REP_ERR, "no final reply")
        if option == OPT_SR:
            self.expect(
                final != REP_ACK or (not data and not structured),
                f"SR with data {bytes(data).hex()} accepted",
            )
            return (structured or final == REP_ACK), meta
        if option == OPT_STARTTLS:
            may = not data and self.t.tls != "off" and not self.secured
            self.expect(final & REP_ERR or may, f"STARTTLS {bytes(data).hex()} accepted")
            if final & REP_ERR:
                return None
            self.stats.count(self.stats.tls, "starttls-in-negotiation")
            await self.tls_handshake()
            return False, None  # TLS wipes what was negotiated before it (spec)
        if option == OPT_SET_META:
            ids = self.check_meta(reps, structured, set_=True) if final == REP_ACK else ()
            parsed = parse_meta(bytes(data))
            if final == REP_ACK:
                self.expect(parsed is not None, f"malformed SET_META accepted: {data.hex()}")
                assert parsed is not None
                return structured, (parsed[0], ids)
            return structured, None
        several = self.t.exports is not None or self.stand_in is not None
        if option in (OPT_GO, OPT_INFO) and final != REP_ACK and several:
            name = parse_info(bytes(data))
            if self.stand_in is not None:  # any name that is an NBD string
                served = name is not None and is_nbd_string(name)
            elif self.t.export_of is None:
                served = name in self.models
            else:
                served = name is not None and self.t.export_of(name) is not None
            self.expect(not served, f"well-formed {option} for {name!r} refused: {reps[-1]}")
        if option == OPT_GO and final == REP_ACK:
            name = parse_info(bytes(data))
            self.expect(name is not None, f"malformed GO accepted: {bytes(data).hex()}")
            assert name is not None
            self.bind(name)
            s = self.check_info(reps, structured)
            assert s is not None
            s.meta_ids = meta[1] if meta and meta[0] == name else ()
            if not s.block_max_advertised:
                s.block_min, s.block_max = self.t.block_min, self.t.block_max
            self.s = s
            await self.transmission()
            return "closed"
        if option == OPT_INFO and final == REP_ACK:
            name = parse_info(bytes(data))
            self.expect(name is not None, f"malformed INFO accepted: {bytes(data).hex()}")
            assert name is not None
            mine = self.name
            self.bind(name)  # only to judge the size: the GO to come names ours
            self.check_info(reps, structured)
            self.bind(mine)
        return None

    # Transmission ---------------------------------------------------------------------------

    def keeps_protected(self, cmd: int, offset: int, length: int, payload: bytes | None) -> bool:
        """Whether the request leaves the protected bytes as they are. They never change, so
        they are judged against the initial image (a read of a changed one fails the run)."""
        for lo, hi in self.t.protected:
            a, b = max(lo, offset), min(hi, offset + length)
            if a >= b:
                continue
            held = self.t.initial[a:b]
            if cmd == WRITE:
                assert payload is not None
                if payload[a - offset : b - offset] != held:
                    return False
            elif any(held):
                return False
        return True

    def next_cookie(self) -> int:
        if self.rng.random() < 0.02:
            edge = self.rng.choice([0, (1 << 64) - 1, 1 << 63])
            if edge not in self.pending:
                return edge
        self.cookie = (self.cookie + 1) % (1 << 64)
        while self.cookie in self.pending:
            self.cookie = (self.cookie + 1) % (1 << 64)
        return self.cookie

    def allowed(
        self, cmd: int, flags: int, offset: int, length: int, payload: bytes | None = None
    ) -> frozenset[int]:
        """The replies the spec (and NBD-NOTES) allows for this request on this session, and
        then the export's kind for one that passes the protocol's checks."""
        s = self.s
        if cmd not in VALID_FLAGS:
            return frozenset({EINVAL})
        errs: set[int] = set()
        ok = True
        if flags & ~VALID_FLAGS[cmd]:
            errs.add(EINVAL)
            ok = False
        unadvertised = 0
        if not s.tflags & T_FUA:
            unadvertised |= FUA
        if not s.tflags & T_FAST_ZERO:
            unadvertised |= FAST_ZERO
        if not (s.tflags & T_DF and s.structured):
            unadvertised |= DF
        if flags & unadvertised:
            errs.add(EINVAL)
            ok = False
        if s.tflags & T_READ_ONLY and cmd in (WRITE, TRIM, ZERO):
            errs.add(EPERM)
            ok = False
        if cmd in ADVERTISED and not s.tflags & ADVERTISED[cmd]:
            errs.add(EINVAL)
            ok = False
        if cmd == BS and not (s.structured and s.meta_ids):
            errs.add(EINVAL)
            ok = False
        if cmd == FLUSH:
            if offset or length:
                errs.add(EINVAL)
        else:
            if offset + length > s.size:
                errs.add(ENOSPC if cmd in (WRITE, ZERO) else EINVAL)
                # Spec: SHOULD; a read may be answered EINVAL either way.
                errs.add(EINVAL)
                ok = False
            elif length == 0:
                errs.add(EINVAL)
            if s.block_min > 1 and (offset % s.block_min or length % s.block_min):
                errs.add(EINVAL)
            if cmd in (READ, WRITE) and length > s.block_max:
                errs |= {EINVAL, ENOMEM} | ({EOVERFLOW} if flags & DF else set())
                ok = ok and not s.block_max_advertised
        if ok:
            errs |= self.outcomes(cmd, flags, offset, length, payload)
        return frozenset(errs)

    def outcomes(
        self, cmd: int, flags: int, offset: int, length: int, payload: bytes | None
    ) -> set[int]:
        """What a well-formed request may get from this kind of export."""
        t, fast = self.t, cmd == ZERO and bool(flags & FAST_ZERO)
        if fast and t.fast_zero_fails:
            out = {ENOTSUP}
        elif cmd not in (WRITE, TRIM, ZERO) or t.writes in ("store", "discard"):
            out = {0, ENOTSUP} if fast else {0}
        elif t.writes == "full":
            out = {ENOTSUP} if fast else {ENOSPC}
        elif cmd == WRITE:  # "match", "sparse-match": the bytes must be what is there
            assert payload is not None
            out = {0} if payload == self.model.data[offset : offset + length] else {EIO}
        elif t.writes == "check" and fast:
            # checkwrite: a fast zero never reads; it passes only where extents say zero.
            out = {0, ENOTSUP} if not any(self.model.data[offset : offset + length]) else {ENOTSUP}
        elif t.writes in ("sparse-match", "check"):
            # Data bytes are never zero there: a range of zeros is a range of holes.
            holes = not any(self.model.data[offset : offset + length])
            out = {0} if holes else {EIO}
        else:
            out = {EIO}
        if (
            t.protected
            and cmd in (WRITE, TRIM, ZERO)
            and not (cmd == TRIM and t.protected_trims_pass)
            and not self.keeps_protected(cmd, offset, length, payload)
        ):
            out = {t.protected_errno, ENOTSUP} if fast else {t.protected_errno}
        if length == 0:
            out.add(0)  # unspecified (NBD-NOTES): the server may answer it as a no-op
        if t.injects:
            out.add(EIO)
        return out

    def random_request(self) -> tuple[int, int, int, int]:
        """(cmd, flags, offset, length): mostly valid, often not."""
        rng, size = self.rng, self.s.size
        cmd = rng.choices(
            [READ, WRITE, FLUSH, TRIM, CACHE, ZERO, BS, -1], [30, 30, 4, 5, 3, 8, 8, 3]
        )[0]
        if cmd == -1:
            cmd = rng.choice([8, 9, 12, 0x7FFF, 0xFFFF])
        flags = 0
        if rng.random() < 0.3:
            flags = rng.choice([FUA, FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO, FAST_ZERO | NO_HOLE])
        if rng.random() < 0.04:
            flags = rng.choice([1 << 5, 1 << 15, 0xFFFF, rng.randrange(1 << 16)])
        length = rng.choice(
            [
                1,
                512,
                4096,
                rng.randint(1, 4096),
                rng.randint(1, 64 * KiB),
                rng.randint(1, 256 * KiB),
            ]
        )
        if cmd in (READ, WRITE) and rng.random() < 0.02:
            length = rng.randint(256 * KiB, SIZE)
        offset = rng.randrange(size) if size else 0
        if rng.random() < 0.5:
            offset -= offset % 4096
        if offset + length > size and rng.random() < 0.9:
            offset = max(0, size - length)
        if 0 < size <= 4096 and rng.random() < 0.4:
            # A tiny export (info's): the whole of it, or a range inside it.
            offset = 0 if rng.random() < 0.5 else rng.randrange(size)
            length = size - offset if rng.random() < 0.5 else rng.randint(1, size - offset)
        # Bad ranges
        r = rng.random()
        if r < 0.03:
            length = 0
        elif r < 0.06:
            offset = size - rng.randint(0, 512)
        elif r < 0.08:
            offset = rng.choice(
                [
                    size,
                    size + 1,
                    (1 << 63) - 1,
                    1 << 63,
                    (1 << 64) - 1,
                    (1 << 64) - length,
                    (1 << 64) - 512,
                ]
            )
        elif r < 0.10 and cmd != WRITE:
            length = rng.choice([0xFFFFFFFF, 0x80000000, 64 * MiB + 1, 32 * MiB + 1])
        if cmd == FLUSH and rng.random() < 0.9:
            offset = length = 0
        return cmd, flags, offset % (1 << 64), length

    async def request(
        self,
        cmd: int,
        flags: int,
        offset: int,
        length: int,
        payload: bytes | None = None,
        cut: int | None = None,
    ) -> None:
        """Send one request (a WRITE's payload cut after `cut` bytes, if given)."""
        cookie = self.next_cookie()
        allowed = self.allowed(cmd, flags, offset, length, payload)
        start = min(offset, self.model.size)
        end = min(offset + length, self.model.size)
        stores = self.t.writes == "store"  # other kinds: a write that succeeds changes nothing
        mutating = cmd in (WRITE, ZERO, TRIM) and 0 in allowed and cut is None and stores
        op = Op(cmd, start, end, mutating)
        header = REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)
        self.trace.append(
            f"{CMD_NAMES[cmd] if cmd < 8 else cmd} flags={flags:#x} "
            f"off={offset} len={length} cookie={cookie:#x}"
        )
        self.stats.requests += 1
        if cut is not None:
            assert payload is not None
            self.model.log(self.tag, f"cut after {cut} bytes, {cookie:#x}", op, payload)
            await self.send(header + payload[:cut])
            return  # never complete: it must not be applied, nor answered
        self.pending[cookie] = Pending(cookie, cmd, flags, offset, length, allowed, op, payload)
        self.model.begin(op)
        self.model.log(self.tag, f"sent {cookie:#x} flags={flags:#x}", op, payload)
        await self.send(header + (payload or b""))

    def payload_for(self, length: int, offset: int) -> bytes:
        rng = self.rng
        same = 0.5 if self.t.writes in ("match", "sparse-match", "check") else 0.05
        same = 0.3 if self.t.protected else same
        if offset + length <= self.model.size and rng.random() < same:
            # What the model says is there (all of it known, for kinds that check writes).
            return bytes(self.model.data[offset : offset + length])
        if rng.random() < 0.1:
            # Data that looks like requests (a DISC among them): it is only data.
            fake = REQUEST.pack(REQUEST_MAGIC, 0, rng.choice([DISC, WRITE, READ]), 7, 0, 0)
            return (fake * (length // len(fake) + 1))[:length]
        if rng.random() < 0.1:
            return bytes(length)
        return rng.randbytes(length)

    async def transmission(self) -> None:
        rng = self.rng
        self.trace.append(f"transmission {self.s}")
        # A full node may still close a session whose handshake won the race (limit's manual).
        self.refusable = self.t.refuses
        receiver = asyncio.ensure_future(self.receive())
        try:
            for _ in range(rng.randint(1, 8)):
                burst = rng.choice([1, 2, 4, 16, 64, rng.randint(1, 200)])
                for _ in range(burst):
                    cmd, flags, offset, length = self.random_request()
                    payload = self.payload_for(length, offset) if cmd == WRITE else None
                    await self.request(cmd, flags, offset, length, payload)
                if rng.random() < 0.6:
                    await self.wait_replies(receiver)
            await self.finish(receiver)
        finally:
            if not receiver.done():
                # We hang up: the receiver stops at the end of what it has. (Cancelling it
                # alone is not enough on 3.11: wait_for may swallow a cancel.)
                self.closing = True
                self.writer.transport.abort()
                receiver.cancel()
                try:
                    await receiver
                except (asyncio.CancelledError, Closed):
                    pass

    async def wait_replies(self, receiver: asyncio.Future[None]) -> None:
        deadline = time.monotonic() + REPLY_TIMEOUT
        while self.pending:
            if receiver.done():
                receiver.result()  # raises the receiver's failure
                raise self.fail(f"connection closed with {len(self.pending)} replies missing")
            if time.monotonic() > deadline:
                missing = ", ".join(f"{p.cookie:#x}" for p in list(self.pending.values())[:5])
                raise self.fail(f"no reply within {REPLY_TIMEOUT} s to {missing} (a hang)")
            await asyncio.sleep(0.005)

    async def finish(self, receiver: asyncio.Future[None]) -> None:
        """End the session in one of the ways a client can (or must not)."""
        rng = self.rng
        how = rng.choice(
            [
                "disc",
                "disc",
                "disc-then-more",
                "half-close",
                "close",
                "abort-read",
                "bad-magic",
                "cut-payload",
                "long-payload",
                "cut-header",
                "huge-write",
                *(["tls-garbage"] if self.secured else []),
            ]
        )
        self.stats.count(self.stats.endings, how)
        self.trace.append(f"finish: {how}")
        self.ending = True  # from now on the node may end the session at any time
        self.unserved()
        size = self.s.size
        if how in ("disc", "disc-then-more", "half-close"):
            disc = REQUEST.pack(REQUEST_MAGIC, 0, DISC, self.next_cookie(), 0, 0)
            if how == "disc":
                await self.send(disc)
                self.disc = True
            elif how == "disc-then-more":
                # Nothing after DISC may be served: these writes must not land, nor be
                # answered. (Replies are awaited first: the server closes with our extra bytes
                # unread, and a write that then fails makes asyncio drop what it had read.)
                await self.wait_replies(receiver)
                more = []
                for _ in range(rng.randint(1, 4)):
                    off = rng.randrange(max(1, size - 4096))
                    self.stats.requests += 1
                    self.trace.append(f"after DISC: write off={off}")
                    more.append(REQUEST.pack(REQUEST_MAGIC, 0, WRITE, 1 << 40, off, 4096))
                    more.append(rng.randbytes(4096))
                self.disc = True
                # The server need not read them: a full socket is no hang (its close is
                # awaited below).
                with contextlib.suppress(ConnectionError, TimeoutError):
                    self.writer.write(disc + b"".join(more))
                    await asyncio.wait_for(self.writer.drain(), REPLY_TIMEOUT)
            if how == "half-close":
                self.half_closed = True
                self.writer.write_eof()
            # Every request before the end must be answered, then the server closes.
            await self.wait_replies(receiver)
            try:
                await asyncio.wait_for(receiver, REPLY_TIMEOUT)
            except TimeoutError:
                raise self.fail("the server did not close after DISC / end of stream") from None
            return
        if how == "close":
            return  # replies still due are lost with the connection
        if how == "abort-read":
            # Ask for big replies, then vanish while they are being sent.
            for _ in range(rng.randint(1, 6)):
                await self.request(READ, 0, 0, min(size, rng.choice([256 * KiB, MiB])))
            await asyncio.sleep(rng.choice([0, 0.001, 0.01]))
            return
        self.fatal = how
        if how == "bad-magic":
            await self.send(
                REQUEST.pack(
                    rng.choice([0x12560953, 0, 0x25609514, 0xFFFFFFFF]), 0, READ, 1, 0, 512
                )
            )
        elif how == "cut-payload":
            length = rng.choice([512, 4096, 65536])
            off = rng.randrange(max(1, size - length))
            await self.request(
                WRITE, 0, off, length, self.payload_for(length, off), cut=rng.randrange(length)
            )
            self.writer.write_eof()
        elif how == "long-payload":
            # Extra bytes after the payload are read as the next request header: garbage.
            length = 4096
            off = rng.randrange(max(1, size - length))
            await self.request(WRITE, 0, off, length, self.payload_for(length, off))
            await self.send(b"\x00GARBAGE" * rng.randint(1, 8))
            self.writer.write_eof()
        elif how == "cut-header":
            await self.send(REQUEST.pack(REQUEST_MAGIC, 0, READ, 1, 0, 512)[: rng.randint(1, 27)])
            self.writer.write_eof()
        elif how == "huge-write":
            length = rng.choice([0xFFFFFFFF, 64 * MiB + 1])
            await self.request(WRITE, 0, 0, length, rng.randbytes(rng.randint(0, 8192)), cut=8192)
            self.writer.write_eof()
        elif how == "tls-garbage":
            # A request in a record that does not decrypt: the node must hang up. Replies still
            # due may be lost, even cut off (the TLS session is broken); those that come whole
            # are judged.
            assert isinstance(self.writer, TLSLink)
            self.closing = True
            self.writer.write_corrupt(REQUEST.pack(REQUEST_MAGIC, 0, READ, 1, 0, 512))
        try:
            await asyncio.wait_for(asyncio.shield(receiver), REPLY_TIMEOUT)
        except TimeoutError:
            raise self.fail(f"the server did not close the connection after {how}") from None
        if how in ("cut-payload", "cut-header"):
            # The server saw the end of the stream: what it had whole must still be answered.
            self.expect(not self.pending, f"{len(self.pending)} replies missing after {how}")

    # Replies --------------------------------------------------------------------------------

    async def receive(self) -> None:
        """Read and judge replies until the server closes (then return)."""
        try:
            while True:
                (magic,) = struct.unpack(">I", await self.recv(4))
                if magic == SIMPLE_MAGIC:
                    await self.simple_reply()
                elif magic == CHUNK_MAGIC:
                    await self.chunk()
                else:
                    raise self.fail(f"reply magic {magic:#x}")
        except Closed:
            if self.refusable and not self.closing:
                raise Refused() from None
            if not (self.fatal or self.disc or self.half_closed or self.closing):
                raise self.fail("the server hung up on a well-framed session") from None

    def take(self, cookie: int) -> Pending:
        p = self.pending.get(cookie)
        self.expect(p is not None, f"reply for cookie {cookie:#x}, not in flight")
        assert p is not None
        return p

    async def simple_reply(self) -> None:
        error, cookie = struct.unpack(">IQ", await self.recv(12))
        p = self.take(cookie)
        data = b""
        if p.cmd == READ and error == 0:
            self.expect(not self.s.structured, "simple reply to READ under structured replies")
            data = await self.recv(p.length)
        elif self.s.structured:
            self.expect(p.cmd != BS or error, "simple success reply to BLOCK_STATUS")
            self.expect(p.cmd != READ, "simple (error) reply to READ under structured replies")
        self.complete(p, error, data)

    async def chunk(self) -> None:
        flags, kind, cookie, length = struct.unpack(">HHQI", await self.recv(16))
        self.expect(self.s.structured, "structured chunk without structured replies")
        p = self.take(cookie)
        self.expect(not flags & ~1, f"chunk flags {flags:#x}")
        self.expect(length <= 64 * MiB, f"chunk of {length} bytes")
        body = await self.recv(length)
        lo, hi = p.offset, p.offset + p.length
        if kind == C_NONE:
            self.expect(
                length == 0 and flags & 1 and not p.pieces and not p.statuses,
                "NONE chunk not alone",
            )
        elif kind == C_DATA:
            self.expect(p.cmd == READ and length > 8, f"OFFSET_DATA for {p.cmd}, len {length}")
            (off,) = struct.unpack(">Q", body[:8])
            self.expect(lo <= off and off + length - 8 <= hi, f"data chunk at {off} outside")
            p.pieces.append((off, body[8:]))
        elif kind == C_HOLE:
            self.expect(p.cmd == READ and length == 12, "bad OFFSET_HOLE")
            off, n = struct.unpack(">QI", body)
            self.expect(n and lo <= off and off + n <= hi, f"hole chunk at {off}+{n} outside")
            p.pieces.append((off, bytes(n)))
        elif kind == C_STATUS:
            self.expect(p.cmd == BS and length >= 12 and (length - 4) % 8 == 0, "bad BS chunk")
            (cid,) = struct.unpack(">I", body[:4])
            self.expect(cid in self.s.meta_ids, f"status for context {cid}")
            extents = [struct.unpack(">II", body[i : i + 8]) for i in range(4, length, 8)]
            p.statuses.append((cid, extents))
        elif kind in (C_ERROR, C_ERROR_OFFSET):
            self.expect(length >= 6, "short error chunk")
            err, mlen = struct.unpack(">IH", body[:6])
            extra = 8 if kind == C_ERROR_OFFSET else 0
            self.expect(err and 6 + mlen + extra == length, f"error chunk err={err} mlen={mlen}")
            if kind == C_ERROR_OFFSET:
                (off,) = struct.unpack(">Q", body[-8:])
                self.expect(p.cmd == READ and lo <= off < hi, "ERROR_OFFSET outside the read")
            p.error = p.error or err
        else:
            raise self.fail(f"unknown chunk type {kind}")
        if not flags & 1:
            return
        if p.error:
            self.complete(p, p.error, b"")
            return
        data = b""
        if p.cmd == READ:
            pieces = sorted(p.pieces)
            pos = lo
            for off, piece in pieces:
                self.expect(off == pos, f"read chunks leave a gap or overlap at {pos}")
                pos += len(piece)
            self.expect(pos == hi, f"read chunks cover {pos - lo} of {p.length} bytes")
            data = b"".join(piece for _, piece in pieces)
        elif p.cmd == BS:
            ids = sorted(cid for cid, _ in p.statuses)
            self.expect(ids == sorted(self.s.meta_ids), f"status chunks for {ids}")
        else:
            self.expect(not p.pieces and not p.statuses, "data for a command without any")
        self.complete(p, 0, data)

    def being_served(self) -> None:
        """A reply came: the node serves this client, and never more than its limit at once."""
        self.refusable = False
        if self.served or self.ending:
            return
        self.served = True
        st = self.stats
        st.serving += 1
        st.most_served = max(st.most_served, st.serving)
        limit = self.t.limit
        self.expect(not limit or st.serving <= limit, f"{st.serving} clients served, limit {limit}")

    def unserved(self) -> None:
        if self.served:
            self.served = False
            self.stats.serving -= 1

    def complete(self, p: Pending, error: int, data: bytes) -> None:
        self.being_served()
        del self.pending[p.cookie]
        self.model.end(p.op)
        self.model.log(self.tag, f"reply {p.cookie:#x} error={error}", p.op, data or None)
        self.stats.replies += 1
        self.stats.count(self.stats.errors, error)
        what = (
            f"{CMD_NAMES[p.cmd] if p.cmd < 8 else p.cmd} flags={p.flags:#x} off={p.offset} "
            f"len={p.length}"
        )
        self.trace.append(f"reply {p.cookie:#x}: {error}")
        self.expect(error in p.allowed, f"{what}: error {error}, allowed {sorted(p.allowed)}")
        op = p.op
        if error:
            if op.mutates and self.t.injects and error == EIO:
                # Under an error filter: the brief allows a failed write to have done anything
                # to its range (an injected one never began, a retried one may have landed).
                self.model.unknown(op.start, op.end, trimmed=p.cmd == TRIM)
            return
        if not op.mutates:
            pass  # a write-side request that changes nothing, or a read
        elif p.cmd == WRITE:
            assert p.payload is not None
            self.model.apply(op, p.payload)
        elif p.cmd == ZERO:
            self.model.apply(op, bytes(op.end - op.start))
        elif p.cmd == TRIM:
            self.model.apply(op, None)
        if p.cmd == READ:
            self.expect(len(data) == p.length, f"{what}: {len(data)} bytes read")
            bad = self.model.mismatch(op, data)
            if bad is not None:
                raise self.fail(
                    f"{what}: byte at {bad} reads {data[bad - op.start]:#x}, the model says "
                    f"{self.model.data[bad]:#x}\n    {self.model.about(bad)}"
                )
            self.expect(MARKER[:8] not in data, f"{what}: bytes from outside the export")
            if self.t.volatile is not None:
                wrong = self.t.volatile(p.offset, data, self.connected_at)
                self.expect(wrong is None, f"{what}: {wrong}")
        elif p.cmd == BS:
            self.check_extents(p, op)

    def check_extents(self, p: Pending, op: Op) -> None:
        for _, extents in p.statuses:
            self.expect(extents, "a status chunk without descriptors")
            self.expect(not p.flags & REQ_ONE or len(extents) == 1, "REQ_ONE gave several")
            pos = p.offset
            for n, flags in extents:
                self.expect(n > 0, "zero-length extent")
                self.expect(not flags & ~3, f"extent flags {flags:#x}")
                self.expect(not (flags and self.t.all_data), f"extent {pos}+{n} flags {flags}")
                end = min(pos + n, self.s.size)
                if flags & 2 and end > pos:  # ZERO: must read as zeros
                    sub = Op(READ, pos, end, False, op.conflicts)
                    bad = self.model.mismatch(sub, bytes(end - pos), zero_only=False)
                    self.expect(bad is None, f"extent {pos}+{n} says zero; byte {bad} is not")
                pos += n
            # Only the last extent may run past the request; none past the export.
            last = extents[-1][0]
            self.expect(pos - last < p.offset + p.length, "extents past the request")
            self.expect(pos <= self.s.size, f"extents run to {pos}, past the export end")


def parse_meta(data: bytes) -> tuple[bytes, list[bytes]] | None:
    try:
        (n,) = struct.unpack_from(">I", data)
        name, pos = data[4 : 4 + n], 4 + n
        if len(name) != n:
            return None
        (count,) = struct.unpack_from(">I", data, pos)
        pos += 4
        queries = []
        for _ in range(count):
            (q,) = struct.unpack_from(">I", data, pos)
            queries.append(data[pos + 4 : pos + 4 + q])
            if len(queries[-1]) != q:
                return None
            pos += 4 + q
        if pos != len(data):
            return None
        name.decode()
        return name, queries
    except (struct.error, UnicodeDecodeError):
        return None


def parse_info(data: bytes) -> bytes | None:
    try:
        (n,) = struct.unpack_from(">I", data)
        name = data[4 : 4 + n]
        (count,) = struct.unpack_from(">H", data, 4 + n)
        if len(name) != n or len(data) != 6 + n + 2 * count:
            return None
        name.decode()
        return name
    except (struct.error, UnicodeDecodeError):
        return None


# The run --------------------------------------------------------------------------------------


def assert_healthy(target: Target) -> None:
    for p in target.procs:
        check(p.proc.poll() is None, f"{p.info.get('uri')}: the node died: {p.stderr()[-3000:]}")
        log = p.stderr()
        for bad in BAD_LOG_LINES:
            check(bad not in log, f"a node's stderr has {bad!r}:\n{log[-4000:]}")


def verify(target: Target, models: dict[bytes, Model]) -> None:
    """A well-behaved client is served and reads exactly what the models know."""
    # Requests of connections the clients cut off may still be running: wait until every
    # session has ended (it must: a session that never ends is a hang).
    deadline = time.monotonic() + REPLY_TIMEOUT
    while sessions_open(target.node, max(0.1, deadline - time.monotonic())) > target.held:
        check(time.monotonic() < deadline, f"[{target.name}] sessions still open after the batch")
        time.sleep(0.02)
    if target.when_idle is not None:
        target.when_idle()
    for name, model in models.items():
        verify_export(target, name, model)


def verify_export(target: Target, name: bytes, model: Model) -> None:
    connected_at = time.monotonic()
    first = read_all(target.uri(name))
    if target.volatile is not None:
        wrong = target.volatile(0, first, connected_at)
        check(wrong is None, f"[{target.name} {name!r}] a libnbd read: {wrong}")
    check(len(first) == model.size, f"export {name!r}: size changed")
    if first != model.data:
        for blk in range(0, model.size, 4096):
            got, want = first[blk : blk + 4096], model.data[blk : blk + 4096]
            if got == want:
                continue
            known = model.known[blk : blk + 4096]
            for i in range(len(got)):
                if known[i] and got[i] != want[i]:
                    raise FuzzFailure(
                        f"[{target.name} {name!r}] byte {blk + i} reads {got[i]:#x}, model: "
                        f"{want[i]:#x} (seed {SEED})\n    {model.about(blk + i)}"
                    )
    check(MARKER[:8] not in first, f"[{target.name}] a libnbd read shows bytes outside the window")
    model.settle(first)


async def run_batch(target: Target, models: dict[bytes, Model], batch: int, stats: Stats) -> None:
    rng = random.Random(f"{SEED}:{target.name}:{batch}")
    clients = [
        Client(
            target,
            models,
            random.Random(f"{SEED}:{target.name}:{batch}:{i}"),
            stats,
            f"batch {batch} client {i}",
        )
        for i in range(rng.randint(1, 6))
    ]
    results = await asyncio.gather(*(c.run() for c in clients), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r


SHAPES = [
    "memory",
    "file",
    "cow",
    "cache",
    "blocksize",
    "offset",
    "truncate",
    "partition",
    "mirror",
    "parity",
    "read-only",
]
#: Shapes added later, FUZZ_SECONDS_MORE each.
MORE_SHAPES = [
    "concat",
    "split",
    "partitioning",
    "stripe",
    "quorum",
    "verify",
    "readahead",
    "retry",
    "delay",
    "error",
    "rate",
    "log",
    "stats",
    "nocache",
    "nocache-none",
    "noextents",
    "nozero",
    "nozero-none",
    "fua",
    "cow-on-read",
    "blocksize-512",
    "blocksize-64k",
    "pattern",
    "null",
    "zero",
    "full",
    "random",
    "sparse-random",
    "data",
    "xz",
    "xz-whole",
    "gzip",
    "dir",
    "exportname",
    "exportname-strict",
    "exportname-many",
    "protect",
    "nbd",
    "nbd-libnbd",
    "nbd-polling",
    "offset-libnbd",
    "nofilter",
    "empty",
    "http",
    "http-cow",
    "ssh",
    "ip",
    "info",
    "info-base64exportname",
    "info-address",
    "info-time",
    "info-uptime",
    "info-conntime",
    "tls-require",
    "tls-on",
    "tls-chain",
    "tls-fallback",
    "tls-relay",
    "checkwrite",
    "swab-16",
    "swab-64",
    "cacheextents",
    "extentlist",
    "ddrescue",
    "tar",
    "qcow2dec",
    "ext2",
    "luks",
    "scan",
    "retry-request",
    "blocksize-policy-error",
    "blocksize-policy-allow",
    "tmpdisk",
    "ondemand",
    "linuxdisk",
    "iso",
    "floppy",
    "cdi",
    "sh",
    "eval",
    "python",
    "pause",
    *CONNECTION_SHAPES,
]


@pytest.fixture
def start_http(tmp_path: Path) -> Iterator[Callable[[bytes], str]]:
    """Serve an image over HTTP on loopback (bench's aiohttp server): returns its URL."""
    servers: list[HttpServer] = []

    def start(image: bytes) -> str:
        root = tmp_path / f"www{len(servers)}"
        root.mkdir()
        (root / "disk.img").write_bytes(image)
        servers.append(HttpServer(root))
        return servers[-1].url("files")

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test CA and the server certificate of the TLS shapes."""
    directory = tmp_path_factory.mktemp("fuzz-tls") / "pki"
    make_certificates(directory)
    return directory


@pytest.fixture
def fuzz_target(
    request: pytest.FixtureRequest, start_node: Any, start_http: Any, tmp_path: Path
) -> Iterator[Target]:
    if request.param.startswith("tls-"):
        target = tls_shape(request.param, start_node, request.getfixturevalue("pki"))
        target.seconds = FUZZ_SECONDS_MORE
    elif request.param in MORE_SHAPES:
        target = build_more(request.param, start_node, tmp_path, start_http)
        target.seconds = FUZZ_SECONDS_MORE
    else:
        target = build_target(request.param, start_node, tmp_path)
    import nbd

    try:
        with libnbd(target.uri(target.names[0])) as h:
            target.block_min = h.get_block_size(nbd.SIZE_MINIMUM) or 1
            target.block_max = h.get_block_size(nbd.SIZE_MAXIMUM) or 32 * MiB
        yield target
    finally:
        for cleanup in target.cleanups:
            with contextlib.suppress(Exception):  # after a failure the node may be gone
                cleanup()


@pytest.mark.parametrize("fuzz_target", SHAPES + MORE_SHAPES, indirect=True)
def test_fuzz_node(fuzz_target: Target) -> None:
    target = fuzz_target
    print(
        f"fuzz {target.name}: seed {SEED} (replay: NBDFABRIC_FUZZ_SEED={SEED}), {target.seconds} s"
    )
    try:
        fuzz(target)
    except FuzzFailure as exc:
        raise FuzzFailure(f"{target.name}, seed {SEED}: {exc}") from None


def fuzz(target: Target) -> None:
    models = {name: target.model(target.initial_of(name)) for name in target.names}
    for alias, name in target.aliases.items():
        models[alias] = models[name]  # one export by two names: what one writes, both read
    stats = Stats()
    verify(target, models)
    deadline = time.monotonic() + target.seconds
    rss_start: dict[int, int] = {}

    def refused() -> int:
        return stats.endings.get("refused", 0)

    while (
        time.monotonic() < deadline
        or stats.batches < 2
        or (target.refuses and not refused() and stats.batches < 20)  # until it was full once
    ):
        if target.before_batch is not None:
            target.before_batch()
        try:
            asyncio.run(run_batch(target, models, stats.batches, stats))
        finally:
            if target.after_batch is not None:
                target.after_batch()
        verify(target, models)
        assert_healthy(target)
        stats.batches += 1
        if stats.batches == 1:
            rss_start = {p.pid: rss_kib(p.pid) for p in target.procs}
    print(f"fuzz {target.name}: {stats}")
    check(not target.refuses or refused(), "no client was refused: the node was never full")
    if target.check_below is not None:
        target.check_below(read_all(target.uri(), flush=True), models[b""].trimmed)
    if target.check_named is not None:
        for name, model in models.items():
            target.check_named(name, read_all(target.uri(name), flush=True), model.trimmed)
    for p in target.procs:
        grown = rss_kib(p.pid) - rss_start[p.pid]
        # Buffer pools (64 MiB at most) and the data (a few MiB) are bounded; more is a leak.
        check(grown < 100 * 1024, f"RSS of {p.pid} grew by {grown} KiB during the run")
    assert_healthy(target)
    if target.ends_itself is not None:
        target.ends_itself()  # then stop() below finds it gone, and gives its status
    for p in target.procs:  # top first: a node shuts down cleanly after all that
        check(p.stop() == 0, f"{p.pid} exited {p.proc.returncode}: {p.stderr()[-2000:]}")
    assert_healthy_logs(target)
    if target.after_stop is not None:
        target.after_stop()


def assert_healthy_logs(target: Target) -> None:
    for p in target.procs:
        log = p.stderr()
        for bad in BAD_LOG_LINES:
            check(bad not in log, f"a node's stderr has {bad!r}:\n{log[-4000:]}")


def test_fuzz_ip_refuses_every_client(start_node: Any) -> None:
    """An ip node that refuses the fuzz clients (its unix socket; it admits 127.0.0.1 on TCP):
    every attempt, whatever it sends, sees the connection closed without a byte (no greeting,
    so never data), and the node stays healthy: its sessions end, it serves TCP clients on and
    stops cleanly."""
    rng = random.Random(f"{SEED}:ip-deny")
    image = rng.randbytes(SIZE)
    up = memory_with(start_node, image)
    node = under_test(
        start_node,
        "ip",
        "allow=127.0.0.1",
        "deny=all",
        upstreams=[up.uri],
        extra=("--listen", "127.0.0.1:0"),
    )
    (tcp,) = [uri for uri in node.info["uris"] if uri.startswith("nbd://")]
    target = Target("ip-deny", node, [node, up], image)
    print(f"fuzz ip-deny: seed {SEED} (replay: NBDFABRIC_FUZZ_SEED={SEED})")
    tried: dict[str, int] = {}

    async def batch() -> None:
        clients = [random.Random(rng.random()) for _ in range(rng.randint(1, 6))]
        for how in await asyncio.gather(*(refused(node.socket, r) for r in clients)):
            tried[how] = tried.get(how, 0) + 1

    try:
        deadline = time.monotonic() + FUZZ_SECONDS_MORE
        while time.monotonic() < deadline:
            asyncio.run(batch())
            assert_healthy(target)
        verify(target, {})  # every refused session has ended
        check(read_all(tcp) == image, "the admitted TCP client does not read the disk")
        assert_healthy(target)
    except FuzzFailure as exc:
        raise FuzzFailure(f"ip-deny, seed {SEED}: {exc}") from None
    print(f"fuzz ip-deny: {tried}")
    for p in target.procs:
        check(p.stop() == 0, f"{p.pid} exited {p.proc.returncode}: {p.stderr()[-2000:]}")
    assert_healthy_logs(target)


async def refused(path: str, rng: random.Random) -> str:
    """One client the node must refuse: it sends some or all of a handshake (or hangs up) and
    must get nothing back but the end of the connection. Returns what it did."""
    how = rng.choice(["nothing", "flags", "go", "garbage", "seed", "hang-up"])
    data = {
        "nothing": b"",
        "flags": struct.pack(">I", 3),
        "go": struct.pack(">IQII", 3, IHAVEOPT, OPT_GO, 6) + bytes(6),
        "garbage": rng.randbytes(rng.randint(1, 600)),
        "seed": rng.choice(SEEDS).read_bytes() if SEEDS else b"",
        "hang-up": b"",
    }[how]
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), REPLY_TIMEOUT)
    except TimeoutError:
        raise FuzzFailure(f"[ip-deny] connecting took over {REPLY_TIMEOUT} s") from None
    try:
        if how == "hang-up":
            return how
        writer.write(data)
        await asyncio.wait_for(writer.drain(), REPLY_TIMEOUT)
        got = await asyncio.wait_for(reader.read(1 << 16), REPLY_TIMEOUT)
    except ConnectionError:
        got = b""  # reset before or while we sent: refused all the same
    except TimeoutError:
        raise FuzzFailure(f"[ip-deny] {how}: not closed within {REPLY_TIMEOUT} s") from None
    finally:
        writer.transport.abort()
    check(got == b"", f"[ip-deny] {how}: a refused client was sent {got[:40].hex()}")
    return how


def test_fuzz_harness_gives_up_on_a_hung_node(start_node: Any, monkeypatch: Any) -> None:
    """A node that stops answering fails the run within about REPLY_TIMEOUT, wherever the
    harness waits: a libnbd read (reads delayed for an hour), the raw clients' handshake, the
    metrics and a libnbd handshake (a SIGSTOPped node). Not a pytest timeout: a blocking libnbd
    call outlives pytest-timeout's alarm, so this test's own watchdog ends a hang by killing the
    node."""
    monkeypatch.setattr(sys.modules[__name__], "REPLY_TIMEOUT", 1.0)
    memory = under_test(start_node, "memory", str(SIZE))
    delayed = under_test(start_node, "delay", "delay-read=1h", upstreams=[memory.uri])
    watchdog = threading.Timer(30, lambda: (delayed.kill(), memory.kill()))
    watchdog.start()

    def gives_up(run: Callable[[], object], why: str) -> None:
        start = time.monotonic()
        with pytest.raises(FuzzFailure, match=why):
            run()
        check(time.monotonic() - start < 3, f"gave up after {time.monotonic() - start:.1f} s")

    try:
        stalled = Target("delay-1h", delayed, [delayed, memory], bytes(SIZE), seconds=0)
        gives_up(lambda: fuzz(stalled), "libnbd: no answer to a read")
        stopped = Target("stopped", memory, [memory], bytes(SIZE), seconds=0)
        os.kill(memory.pid, signal.SIGSTOP)
        models = {b"": Model(bytes(SIZE))}
        gives_up(lambda: asyncio.run(run_batch(stopped, models, 0, Stats())), "no data from")
        gives_up(lambda: asyncio.run(flood(stopped, models)), "took no data")
        gives_up(lambda: verify(stopped, models), "metrics did not answer")
        gives_up(lambda: read_all(memory.uri), "libnbd: no answer to the handshake")
    finally:
        watchdog.cancel()
        os.kill(memory.pid, signal.SIGCONT)
        delayed.kill()  # its read sleeps on: a clean stop would wait for it


async def flood(target: Target, models: dict[bytes, Model]) -> None:
    """Send more than the socket holds to a node that reads nothing."""
    client = Client(target, models, random.Random(0), Stats(), "flood")
    client.reader, client.writer = await asyncio.open_unix_connection(target.node.socket)
    try:
        await client.send(bytes(16 * MiB))
    finally:
        client.writer.transport.abort()
