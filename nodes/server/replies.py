"""READ replies built from pieces: views of the data, and holes (sans-IO).

A backend's read comes back as pieces in order: views of bytes (of a pooled buffer, or of the
backend's own memory when it lends it) and hole lengths that read as zeros. The reply sends the
views as they are (no copy into one buffer) and holes as views of one shared zero buffer, or,
with structured replies, as OFFSET_HOLE chunks when they are long enough to be worth one.
"""

from __future__ import annotations

from ..base import Holes, Piece
from ..protocol import transmission as tx
from ..protocol.constants import Err
from .stream import Buffer

#: A hole shorter than this is sent as zeros: a chunk header costs more than the bytes.
MIN_HOLE_CHUNK = 4096
ZERO_CHUNK = 1024 * 1024
ZEROES = bytes(ZERO_CHUNK)
ZERO_VIEW = memoryview(ZEROES)  #: sliced, never copied: zeroes to send or to write


def pieces_of(view: memoryview, holes: Holes) -> list[Piece]:
    """A read into `view` whose `holes` (start, length) the backend left unfilled, as pieces."""
    if not holes:
        return [view] if len(view) else []
    pieces: list[Piece] = []
    pos = 0
    for start, length in holes:
        if start < pos:  # overlapping holes: keep only the new part
            length -= pos - start
            start = pos
            if length <= 0:
                continue
        if start > pos:
            pieces.append(view[pos:start])
        pieces.append(length)
        pos = start + length
    if pos < len(view):
        pieces.append(view[pos:])
    return pieces


def read_reply(
    t: tx.Transmission, req: tx.Request, pieces: list[Piece], valid: int, df: bool
) -> list[Buffer]:
    """The reply to `req` whose first `valid` bytes are `pieces` (`valid` is short of the
    length only for an --eof-tolerant read past the end: an ERROR_OFFSET chunk covers the rest).
    Plain data where the client needs it (simple replies, DF), else data and hole chunks."""
    cookie, offset = req.cookie, req.offset
    done = valid == req.length
    if len(pieces) == 1 and type(pieces[0]) is memoryview:
        data: list[Buffer] = [pieces[0]]  # the common case: one piece, all data
    elif not t.structured or df or not _has_hole_chunk(pieces):
        data = _flatten(pieces)
    else:
        return _tail(t, req, _sparse_chunks(cookie, offset, pieces, done), valid)
    if not t.structured:
        return [tx.simple_reply(cookie), *data]
    if not valid:
        return [tx.none_chunk(cookie)]
    parts = [tx.data_chunk_header(cookie, offset, valid, done), *data]
    return parts if done else _tail(t, req, parts, valid)


def _tail(t: tx.Transmission, req: tx.Request, parts: list[Buffer], valid: int) -> list[Buffer]:
    if valid < req.length:
        parts.append(
            tx.error_chunk(req.cookie, Err.EINVAL, "read past the end of the export", t.size)
        )
    return parts


def _zeros(length: int) -> list[Buffer]:
    """Views of the shared zero buffer covering `length` bytes."""
    out: list[Buffer] = []
    while length:
        n = min(length, ZERO_CHUNK)
        out.append(ZERO_VIEW[:n])
        length -= n
    return out


def _flatten(pieces: list[Piece]) -> list[Buffer]:
    """The pieces as plain data: holes become zeros."""
    out: list[Buffer] = []
    for piece in pieces:
        if isinstance(piece, int):
            out += _zeros(piece)
        else:
            out.append(piece)
    return out


def _has_hole_chunk(pieces: list[Piece]) -> bool:
    return any(type(p) is int and p >= MIN_HOLE_CHUNK for p in pieces)


def _sparse_chunks(cookie: int, offset: int, pieces: list[Piece], done: bool) -> list[Buffer]:
    """DATA and HOLE chunks covering the pieces (a hole shorter than MIN_HOLE_CHUNK goes as
    zeros inside a data chunk); the last chunk is marked DONE when `done`."""
    chunks: list[tuple[int, int, list[Buffer] | None]] = []  # (start, length, data or hole)
    run: list[Buffer] = []
    run_start = pos = 0
    for piece in pieces:
        if isinstance(piece, int):
            if piece >= MIN_HOLE_CHUNK:
                if run:
                    chunks.append((run_start, pos - run_start, run))
                    run = []
                chunks.append((pos, piece, None))
                run_start = pos + piece
            else:
                run += _zeros(piece)
            pos += piece
        else:
            run.append(piece)
            pos += len(piece)
    if run:
        chunks.append((run_start, pos - run_start, run))
    parts: list[Buffer] = []
    last = len(chunks) - 1
    for i, (start, length, data) in enumerate(chunks):
        final = done and i == last
        if data is None:
            parts.append(tx.hole_chunk(cookie, offset + start, length, final))
        else:
            parts.append(tx.data_chunk_header(cookie, offset + start, length, final))
            parts += data
    return parts
