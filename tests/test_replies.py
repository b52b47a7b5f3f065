"""READ replies built from pieces (nodes/server/replies.py), decoded back: whatever mix of data
views and holes a backend returns, the client reads exactly the bytes, holes read as zeros, the
last chunk alone carries DONE, and DF or simple replies never contain a hole chunk.
"""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from nodes.protocol import transmission as tx
from nodes.protocol.constants import TFlag
from nodes.server.replies import MIN_HOLE_CHUNK, pieces_of, read_reply

COOKIE, OFFSET, SIZE = 0x1234, 1 << 20, 1 << 30
OFFSET_DATA, OFFSET_HOLE, ERROR_OFFSET = 1, 2, (1 << 15) + 2
segments = st.lists(
    st.tuples(st.booleans(), st.integers(1, 3 * MIN_HOLE_CHUNK)), min_size=0, max_size=12
)


def transmission(structured: bool) -> tx.Transmission:
    return tx.Transmission(size=SIZE, tflags=TFlag.SEND_DF, structured=structured, meta_contexts=[])


def build(segs: list[tuple[bool, int]]) -> tuple[list[memoryview | int], bytes]:
    """Pieces for the segments (True: data, False: hole) and the bytes they stand for."""
    pieces: list[memoryview | int] = []
    expected = bytearray()
    for i, (is_data, n) in enumerate(segs):
        if is_data:
            data = bytes([i % 250 + 1]) * n
            pieces.append(memoryview(bytearray(data)))
            expected += data
        else:
            pieces.append(n)
            expected += bytes(n)
    return pieces, bytes(expected)


def decode_structured(wire: bytes, length: int) -> tuple[bytes, list[int], list[bool]]:
    """The bytes a client reassembles, the chunk types, and which chunks said DONE."""
    out = bytearray(length)
    kinds: list[int] = []
    dones: list[bool] = []
    pos = 0
    while pos < len(wire):
        magic, flags, kind, cookie, size = struct.unpack_from(">IHHQI", wire, pos)
        assert magic == 0x668E33EF and cookie == COOKIE
        body = wire[pos + 20 : pos + 20 + size]
        pos += 20 + size
        kinds.append(kind)
        dones.append(bool(flags & 1))
        if kind == OFFSET_DATA:
            (at,) = struct.unpack_from(">Q", body)
            out[at - OFFSET : at - OFFSET + len(body) - 8] = body[8:]
        elif kind == OFFSET_HOLE:
            at, n = struct.unpack(">QI", body)
            assert out[at - OFFSET : at - OFFSET + n] == bytes(n)
    return bytes(out), kinds, dones


@given(segments, st.booleans())
def test_structured_read_reply_decodes_to_the_bytes(segs: list[tuple[bool, int]], df: bool) -> None:
    pieces, expected = build(segs)
    req = tx.Request(0, 0, COOKIE, OFFSET, len(expected))
    wire = b"".join(
        bytes(p) for p in read_reply(transmission(True), req, pieces, len(expected), df)
    )
    got, kinds, dones = decode_structured(wire, len(expected))
    assert got == expected
    assert dones == [False] * (len(dones) - 1) + [True]
    if df:
        assert OFFSET_HOLE not in kinds and len(kinds) == 1
    holes = [n for is_data, n in segs if not is_data]
    if not df and any(n >= MIN_HOLE_CHUNK for n in holes):
        assert OFFSET_HOLE in kinds  # long holes stay holes


@given(segments)
def test_simple_read_reply_is_the_bytes(segs: list[tuple[bool, int]]) -> None:
    pieces, expected = build(segs)
    req = tx.Request(0, 0, COOKIE, OFFSET, len(expected))
    wire = b"".join(
        bytes(p) for p in read_reply(transmission(False), req, pieces, len(expected), False)
    )
    assert wire == tx.simple_reply(COOKIE) + expected


@given(segments, st.integers(1, 5000))
def test_eof_tolerant_tail_is_an_error_offset_chunk(
    segs: list[tuple[bool, int]], past: int
) -> None:
    pieces, expected = build([*segs, (True, 1)])
    req = tx.Request(0, 0, COOKIE, OFFSET, len(expected) + past)
    wire = b"".join(
        bytes(p) for p in read_reply(transmission(True), req, pieces, len(expected), False)
    )
    got, kinds, dones = decode_structured(wire, len(expected))
    assert got == expected
    assert kinds[-1] == ERROR_OFFSET and dones == [False] * (len(dones) - 1) + [True]


def test_pieces_of_a_buffer_with_holes() -> None:
    view = memoryview(bytearray(b"abcdefghij"))
    assert pieces_of(view, None) == [view]
    assert pieces_of(view[:0], None) == []
    got = pieces_of(view, [(2, 3), (4, 2), (9, 1)])  # overlapping holes are merged
    assert [p if isinstance(p, int) else bytes(p) for p in got] == [b"ab", 3, 1, b"ghi", 1]
    got = pieces_of(view, [(2, 3), (3, 2)])  # a hole inside the last one adds no piece
    assert [p if isinstance(p, int) else bytes(p) for p in got] == [b"ab", 3, b"fghij"]


def test_a_hole_of_min_hole_chunk_bytes_is_a_hole_chunk_and_a_shorter_one_zeros() -> None:
    # MIN_HOLE_CHUNK is the shortest hole worth a chunk: only shorter ones go as zeros.
    for hole, kinds in (
        (MIN_HOLE_CHUNK, [OFFSET_DATA, OFFSET_HOLE]),
        (MIN_HOLE_CHUNK - 1, [OFFSET_DATA]),
    ):
        pieces, expected = build([(True, 10), (False, hole)])
        req = tx.Request(0, 0, COOKIE, OFFSET, len(expected))
        wire = b"".join(
            bytes(p) for p in read_reply(transmission(True), req, pieces, len(expected), False)
        )
        got, got_kinds, _ = decode_structured(wire, len(expected))
        assert (got, got_kinds) == (expected, kinds)
