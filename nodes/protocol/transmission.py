"""Sans-IO transmission phase: request headers in, validated requests out; replies encoded.

The server's hot path reads headers and payloads itself (straight into pooled buffers) and uses
`parse_request` + `validate`; `RequestParser` wraps the same functions for byte-stream callers
(tests, fuzzing). Replies are returned as small header `bytes` so payloads can go out zero-copy.
"""

from __future__ import annotations

import bisect
import functools
import operator
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from .constants import (
    CHUNK_HEADER,
    ERROR_HEAD,
    EXTENT,
    FLAGS_VALID_FOR,
    MAX_EXTENTS,
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
    Extent,
    ReplyFlag,
    TFlag,
    wire_string,
)
from .errors import ProtocolError


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
class _Rule:
    """What one command may carry on a session, worked out once per way of negotiating."""

    valid: int  #: flags the protocol allows with this command
    allowed: int  #: of those, the ones the export advertised (FUA, DF, FAST_ZERO)
    gate: Err  #: EPERM for a write on a read-only export, else OK
    supported: bool  #: the export advertised the command
    past_end: Err  #: ENOSPC for writes and zeroes past the end, EINVAL otherwise


_WRITES = (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES)
_ADVERTISED_BY = (
    (CmdFlag.FUA, TFlag.SEND_FUA),
    (CmdFlag.DF, TFlag.SEND_DF),
    (CmdFlag.FAST_ZERO, TFlag.SEND_FAST_ZERO),
)
_SUPPORTED_BY = {
    Cmd.FLUSH: TFlag.SEND_FLUSH,
    Cmd.TRIM: TFlag.SEND_TRIM,
    Cmd.WRITE_ZEROES: TFlag.SEND_WRITE_ZEROES,
    Cmd.CACHE: TFlag.SEND_CACHE,
}


#: The largest read or write taken whatever a backend advertises (nbdkit's limit, and libnbd's
#: for what it sends): a payload is one buffer in memory.
MAX_DATA = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Transmission:
    """What validation needs to know about the negotiated session."""

    size: int
    tflags: TFlag
    structured: bool
    meta_contexts: tuple[int, ...]
    block_min: int = 1
    block_max: int = 32 * 1024 * 1024
    #: Refuse requests that break block_min or block_max (EINVAL). False (blocksize-policy's
    #: allow): the backend gets them, reads and writes up to MAX_DATA.
    enforce_block_size: bool = True
    rules: dict[int, _Rule] = field(init=False, repr=False, compare=False)
    #: The alignment and the largest read or write that validate() holds requests to.
    check_min: int = field(init=False, repr=False, compare=False)
    check_max: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rules = _rules(self.tflags, self.structured, bool(self.structured and self.meta_contexts))
        object.__setattr__(self, "rules", rules)
        if self.enforce_block_size:
            object.__setattr__(self, "check_min", self.block_min)
            object.__setattr__(self, "check_max", min(self.block_max, MAX_DATA))
        else:
            object.__setattr__(self, "check_min", 1)
            object.__setattr__(self, "check_max", MAX_DATA)


@functools.lru_cache(maxsize=128)
def _rules(tf: TFlag, structured: bool, status: bool) -> dict[int, _Rule]:
    """The flag and capability checks of each command, folded into one small table so they are
    not redone (with slow enum arithmetic) for every request. They depend only on what was
    negotiated, so sessions that negotiated alike share one table (never changed)."""
    unadvertised = 0
    for flag, tflag in _ADVERTISED_BY:
        if not tf & tflag:
            unadvertised |= flag
    if not structured:
        unadvertised |= CmdFlag.DF  # DF needs structured replies
    rules = {}
    for cmd in Cmd:
        valid = int(FLAGS_VALID_FOR[cmd])
        if cmd == Cmd.BLOCK_STATUS:
            supported = status
        elif cmd in _SUPPORTED_BY:
            supported = bool(tf & _SUPPORTED_BY[cmd])
        else:
            supported = True
        rules[int(cmd)] = _Rule(
            valid=valid,
            allowed=valid & ~unadvertised,
            gate=Err.EPERM if cmd in _WRITES and tf & TFlag.READ_ONLY else Err.OK,
            supported=supported,
            past_end=Err.ENOSPC if cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Err.EINVAL,
        )
    return rules


_OK, _EINVAL, _EOVERFLOW = Err.OK, Err.EINVAL, Err.EOVERFLOW
_READ, _WRITE, _DISC, _FLUSH = int(Cmd.READ), int(Cmd.WRITE), int(Cmd.DISC), int(Cmd.FLUSH)
_BLOCK_STATUS = int(Cmd.BLOCK_STATUS)
_DF = int(CmdFlag.DF)


def validate(req: Request, t: Transmission) -> Err:
    """The error a request must get before any work is done, or Err.OK.

    Order: command, unknown flags, read-only (EPERM wins over a FUA the export does not
    advertise, as in nbdkit), unadvertised flags, capability, range, alignment, size.
    """
    cmd, flags = req.cmd, req.flags
    rule = t.rules.get(cmd)
    if rule is None or flags & ~rule.valid:
        return _EINVAL
    if rule.gate is not _OK:
        return rule.gate
    if flags & ~rule.allowed:
        return _EINVAL
    offset, length = req.offset, req.length
    if cmd == _FLUSH:
        return _OK if rule.supported and not offset and not length else _EINVAL
    if cmd == _DISC:
        return _OK
    if not rule.supported:
        return _EINVAL
    if offset + length > t.size:
        return rule.past_end
    if length == 0:
        # Zero-length requests are no-ops (qemu-nbd), except block status, which must
        # describe at least one extent.
        return _EINVAL if cmd == _BLOCK_STATUS else _OK
    block_min = t.check_min
    if block_min > 1 and (offset % block_min or length % block_min):
        return _EINVAL
    if length > t.check_max and cmd in (_READ, _WRITE):
        return _EOVERFLOW if flags & _DF else _EINVAL
    return _OK


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
    text = wire_string(message)
    payload = ERROR_HEAD.pack(error, len(text)) + text
    if offset is None:
        return chunk(cookie, Chunk.ERROR, payload)
    return chunk(cookie, Chunk.ERROR_OFFSET, payload + U64.pack(offset))


def block_status_chunk(
    cookie: int, context: int, extents: Iterable[tuple[int, int]], done: bool = True
) -> bytes:
    body = bytearray(U32.pack(context))
    for length, flags in extents:
        body += EXTENT.pack(length, flags)
    return chunk(cookie, Chunk.BLOCK_STATUS, bytes(body), done)


def cover(spans: list[tuple[int, int]], start: int, end: int) -> bool:
    """Add the bytes start..end of a READ's reply to `spans` (what its content chunks covered
    so far: sorted, disjoint, touching ones joined): False, and nothing added, if they
    overlap bytes already covered. The chunks may come in any order but MUST NOT overlap; a
    client that only sums their lengths (libnbd 1.14, which says it checks neither) takes
    two overlapping chunks for the whole range while part of it never came, and its buffer
    there keeps what it held before: another request's bytes, in a reused one."""
    i = bisect.bisect_left(spans, (start,))  # the first span that starts at or after start
    joins_left = i > 0 and spans[i - 1][1] == start
    if (i > 0 and spans[i - 1][1] > start) or (i < len(spans) and spans[i][0] < end):
        return False
    if i < len(spans) and spans[i][0] == end:  # touches the next one
        if joins_left:
            spans[i - 1] = (spans[i - 1][0], spans.pop(i)[1])
        else:
            spans[i] = (start, spans[i][1])
    elif joins_left:
        spans[i - 1] = (spans[i - 1][0], end)
    else:
        spans.insert(i, (start, end))
    return True


_ALLOCATION_FLAGS = int(Extent.HOLE | Extent.ZERO)


def context_merge(context: str) -> Callable[[int, int], int] | None:
    """How the values of a meta context's pieces in one block join (clip_extents): None for
    base:allocation (the flags all share); a dirty bitmap's block is dirty if any piece is;
    an allocation depth is the nearest layer any piece comes from (0 only if none is
    allocated). Either way a backup or copy reading them takes too much, never too little."""
    if context.startswith("qemu:dirty-bitmap:"):
        return operator.or_
    if context == "qemu:allocation-depth":
        return lambda a, b: min(a, b) if a and b else a or b
    return None


def align_extents(
    extents: Iterable[tuple[int, int]], align: int, merge: Callable[[int, int], int] = operator.and_
) -> Iterator[tuple[int, int]]:
    """The extents in whole granules of `align` bytes (the spec: descriptor lengths MUST be
    multiples of an advertised minimum block size), but for a short last one: a granule that
    the backend described in several pieces gets their values joined by `merge` (for
    base:allocation the flags all of them share: a hole only if it is a hole throughout,
    zeros only if all zeros, as qemu's server does)."""
    pending, flags_in = 0, -1  # bytes of the granule begun, and the flags they share
    for length, flags in extents:
        if length <= 0:
            continue
        if pending:
            take = min(length, align - pending)
            pending += take
            flags_in = merge(flags_in, flags)
            length -= take
            if pending < align:
                continue
            yield align, flags_in
            pending = 0
        whole = length - length % align
        if whole:
            yield whole, flags
        if length > whole:
            pending, flags_in = length - whole, flags
    if pending:
        yield pending, flags_in


def clip_extents(
    extents: Iterable[tuple[int, int]],
    length: int,
    req_one: bool,
    align: int = 1,
    limit: int = MAX_EXTENTS,
    merge: Callable[[int, int], int] | None = None,
) -> list[tuple[int, int]]:
    """Merge neighbours with equal flags, cut at the request's end, fit u32 lengths.

    Backends may describe more than was asked; the client gets at most `length` bytes' worth
    in at most `limit` descriptors (exactly one with REQ_ONE). Lengths are multiples of
    `align` (align_extents), but for a last one cut short by the request or the backend.
    `merge` (context_merge) joins the values of pieces finer than `align`; without it, the
    context is base:allocation: bits it does not define are reserved and sent as 0.
    """
    if align > 1:
        extents = align_extents(extents, align, merge or operator.and_)
    longest = (0xFFFFFFFF // align) * align
    out: list[tuple[int, int]] = []
    left = length
    for ext_len, flags in extents:
        if left <= 0:
            break
        if ext_len <= 0:
            continue
        if merge is None:  # base:allocation's: the other bits are reserved, sent as 0 (spec)
            flags &= _ALLOCATION_FLAGS
        ext_len = min(ext_len, left)
        left -= ext_len
        if out and out[-1][1] == flags and out[-1][0] + ext_len <= longest:
            out[-1] = (out[-1][0] + ext_len, flags)
        elif len(out) < limit:
            out.append((min(ext_len, longest), flags))
        else:
            break
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
