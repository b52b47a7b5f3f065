"""Sans-IO transmission phase: request headers in, validated requests out; replies encoded.

The server's hot path reads headers and payloads itself (straight into pooled buffers) and uses
`parse_request` + `validate`; `RequestParser` wraps the same functions for byte-stream callers
(tests, fuzzing). Replies are returned as small header `bytes` so payloads can go out zero-copy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .constants import (
    CHUNK_HEADER,
    ERROR_HEAD,
    EXTENT,
    FLAGS_VALID_FOR,
    OFFSET_HOLE,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    U32,
    U64,
    Chunk,
    Cmd,
    CmdFlag,
    Err,
    ReplyFlag,
    TFlag,
)
from .errors import ProtocolError

_ALL_FLAGS = int(CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.DF | CmdFlag.REQ_ONE | CmdFlag.FAST_ZERO)
_KNOWN_CMDS = frozenset(int(c) for c in Cmd)


@dataclass(slots=True)
class Request:
    flags: int
    cmd: int
    cookie: int
    offset: int
    length: int

    @property
    def has_payload(self) -> bool:
        return self.cmd == Cmd.WRITE


def parse_request(header: bytes | bytearray | memoryview) -> Request:
    """Decode one 28-byte request header. A bad magic cannot be resynchronised: ProtocolError."""
    magic, flags, cmd, cookie, offset, length = REQUEST.unpack(header)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#x}")
    return Request(flags, cmd, cookie, offset, length)


@dataclass(frozen=True, slots=True)
class Transmission:
    """What validation needs to know about the negotiated session."""

    size: int
    tflags: TFlag
    structured: bool
    meta_contexts: tuple[int, ...]
    block_min: int = 1
    block_max: int = 32 * 1024 * 1024


def validate(req: Request, t: Transmission) -> Err:
    """The error a request must get before any work is done, or Err.OK.

    Order: command, unknown flags, read-only (EPERM wins over a FUA the export does not
    advertise, as in nbdkit), flags, capability, range, alignment, size.
    """
    cmd, flags, tf = req.cmd, req.flags, t.tflags
    if cmd not in _KNOWN_CMDS:
        return Err.EINVAL
    if flags & ~_ALL_FLAGS or flags & ~FLAGS_VALID_FOR[Cmd(cmd)]:
        return Err.EINVAL
    if cmd in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES) and tf & TFlag.READ_ONLY:
        return Err.EPERM
    if flags & CmdFlag.FUA and not tf & TFlag.SEND_FUA:
        return Err.EINVAL
    if flags & CmdFlag.DF and not (t.structured and tf & TFlag.SEND_DF):
        return Err.EINVAL
    if flags & CmdFlag.FAST_ZERO and not tf & TFlag.SEND_FAST_ZERO:
        return Err.EINVAL
    if cmd == Cmd.FLUSH:
        if not tf & TFlag.SEND_FLUSH or req.offset or req.length:
            return Err.EINVAL
        return Err.OK
    if cmd == Cmd.DISC:
        return Err.OK
    if (
        (cmd == Cmd.TRIM and not tf & TFlag.SEND_TRIM)
        or (cmd == Cmd.WRITE_ZEROES and not tf & TFlag.SEND_WRITE_ZEROES)
        or (cmd == Cmd.CACHE and not tf & TFlag.SEND_CACHE)
        or (cmd == Cmd.BLOCK_STATUS and not (t.structured and t.meta_contexts))
    ):
        return Err.EINVAL
    if req.offset + req.length > t.size:
        return Err.ENOSPC if cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Err.EINVAL
    if req.length == 0:
        # Zero-length requests are no-ops (qemu-nbd), except block status, which must
        # describe at least one extent.
        return Err.EINVAL if cmd == Cmd.BLOCK_STATUS else Err.OK
    if t.block_min > 1 and (req.offset % t.block_min or req.length % t.block_min):
        return Err.EINVAL
    if cmd in (Cmd.READ, Cmd.WRITE) and req.length > t.block_max:
        return Err.EOVERFLOW if flags & CmdFlag.DF else Err.EINVAL
    return Err.OK


# Replies -------------------------------------------------------------------------------------


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk(cookie: int, kind: int, payload: bytes = b"", done: bool = True) -> bytes:
    flags = ReplyFlag.DONE if done else 0
    return CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(payload)) + payload


def none_chunk(cookie: int) -> bytes:
    return chunk(cookie, Chunk.NONE)


def data_chunk_header(cookie: int, offset: int, length: int, done: bool) -> bytes:
    """Header of an OFFSET_DATA chunk; the `length` data bytes follow it on the wire."""
    flags = ReplyFlag.DONE if done else 0
    head = CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, Chunk.OFFSET_DATA, cookie, length + 8)
    return head + U64.pack(offset)


def hole_chunk(cookie: int, offset: int, length: int, done: bool) -> bytes:
    return chunk(cookie, Chunk.OFFSET_HOLE, OFFSET_HOLE.pack(offset, length), done)


def error_chunk(cookie: int, error: int, message: str = "", offset: int | None = None) -> bytes:
    text = message.encode()[:4096]
    payload = ERROR_HEAD.pack(error, len(text)) + text
    if offset is None:
        return chunk(cookie, Chunk.ERROR, payload)
    return chunk(cookie, Chunk.ERROR_OFFSET, payload + U64.pack(offset))


def block_status_chunk(cookie: int, context: int, extents: Iterable[tuple[int, int]]) -> bytes:
    body = bytearray(U32.pack(context))
    for length, flags in extents:
        body += EXTENT.pack(length, flags)
    return chunk(cookie, Chunk.BLOCK_STATUS, bytes(body))


def clip_extents(
    extents: Iterable[tuple[int, int]], length: int, req_one: bool, align: int = 1
) -> list[tuple[int, int]]:
    """Merge neighbours with equal flags, cut at the request's end, fit u32 lengths.

    Backends may describe more than was asked; the client gets at most `length` bytes' worth
    (and exactly one descriptor with REQ_ONE). Lengths stay multiples of `align`.
    """
    limit = (0xFFFFFFFF // align) * align
    out: list[tuple[int, int]] = []
    left = length
    for ext_len, flags in extents:
        if left <= 0:
            break
        if ext_len <= 0:
            continue
        ext_len = min(ext_len, left)
        left -= ext_len
        if out and out[-1][1] == flags and out[-1][0] + ext_len <= limit:
            out[-1] = (out[-1][0] + ext_len, flags)
        else:
            out.append((min(ext_len, limit), flags))
        if req_one:
            break
    if req_one:
        out = out[:1]
    return out


# A byte-stream parser for tests and fuzzing --------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestEvent:
    request: Request
    error: Err  #: validation result; the payload of a rejected WRITE is consumed all the same
    payload: bytes


class RequestParser:
    """Feed client bytes, get `RequestEvent`s; ProtocolError on a stream that cannot continue."""

    def __init__(self, t: Transmission) -> None:
        self.t = t
        self._buf = bytearray()
        self.closed = False

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def events(self) -> list[RequestEvent]:
        out: list[RequestEvent] = []
        while not self.closed and len(self._buf) >= REQUEST.size:
            req = parse_request(bytes(self._buf[: REQUEST.size]))
            need = REQUEST.size + (req.length if req.has_payload else 0)
            if len(self._buf) < need:
                break
            payload = bytes(self._buf[REQUEST.size : need])
            del self._buf[:need]
            out.append(RequestEvent(req, validate(req, self.t), payload))
            if req.cmd == Cmd.DISC:
                self.closed = True
        return out
