"""The memory node's two stores agree page for page: the dict of pages one process uses, and the
shared mapping `--workers` uses (same reads, holes, lent pieces, extents, allocation)."""

from __future__ import annotations

import os
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from nodes.plugins.memory import PAGE, SharedStore, SparseStore

SIZE = 16 * PAGE + 1000  # a last page that is only partly inside the disk

span = st.integers(0, SIZE - 1).flatmap(
    lambda offset: st.tuples(st.just(offset), st.integers(1, min(SIZE - offset, 3 * PAGE)))
)
wide_span = st.integers(0, SIZE - 1).flatmap(
    lambda offset: st.tuples(st.just(offset), st.integers(1, SIZE - offset))
)  # zeroing far more than is written visits the written pages only
op = st.one_of(
    st.tuples(st.just("write"), span, st.integers(0, 255)),
    st.tuples(st.just("zero"), st.one_of(span, wide_span), st.booleans()),
)


def plain(pieces: list) -> list:
    """Lent pieces as (kind, length) runs: the two stores may cut data runs differently."""
    out: list[list] = []
    for piece in pieces:
        kind, n = ("hole", piece) if isinstance(piece, int) else ("data", len(piece))
        if out and out[-1][0] == kind:
            out[-1][1] += n
        else:
            out.append([kind, n])
    return out


def data(pieces: list) -> bytes:
    return b"".join(bytes(p) for p in pieces)  # a hole length gives that many zeros


@settings(max_examples=150, deadline=None)
@given(st.lists(op, max_size=25), span)
def test_shared_store_behaves_like_the_page_dict(ops: list, probe: tuple[int, int]) -> None:
    sparse, shared = SparseStore(), SharedStore(SIZE)
    model = bytearray(SIZE)
    for kind, (offset, length), arg in ops:
        if kind == "write":
            payload = bytes([arg]) * length
            sparse.write(memoryview(payload), offset)
            shared.write(memoryview(payload), offset)
            model[offset : offset + length] = payload
        else:
            sparse.zero(length, offset, punch=arg)
            shared.zero(length, offset, punch=arg)
            model[offset : offset + length] = bytes(length)
    assert shared.allocated_pages() == sparse.allocated_pages()
    for offset, length in (probe, (0, SIZE)):
        want = sparse.lend_read(length, offset)
        got = shared.lend_read(length, offset)
        assert plain(got) == plain(want)
        assert data(got) == data(want) == bytes(model[offset : offset + length])
        assert shared.extents(length, offset) == sparse.extents(length, offset)
        buf_a, buf_b = bytearray(length), bytearray(length)
        assert shared.read(memoryview(buf_a), offset) == sparse.read(memoryview(buf_b), offset)


def test_zeroing_a_huge_range_visits_the_pages_written_not_the_range() -> None:
    """A TRIM or WRITE_ZEROES of 4 GiB is 28 bytes to ask. It looked at each of the range's
    131,072 pages (15 ms on the node, 50 times nbdkit's 0.3 ms; 1000 pipelined: 15 s of the
    node's loop); now at the pages written in it only."""
    for store in (SparseStore(), SharedStore(8 << 30)):
        for index in (3, 70000, 130000):
            store.write(memoryview(b"x" * 10), index * PAGE + 5)
        started = time.process_time()
        for _ in range(100):
            store.zero(4 << 30, 0, punch=False)  # the pages stay: each pass finds them again
        assert time.process_time() - started < 0.5
        assert store.allocated_pages() == 3
        assert data(store.lend_read(20, 70000 * PAGE)) == bytes(20)
        store.zero(4 << 30, 0, punch=True)
        assert store.allocated_pages() == 0


def test_both_stores_describe_the_same_first_extents_and_no_more(monkeypatch) -> None:
    """Over pages written and not in turn, an answer stops after MAX_EXTENTS extents (whole
    ones; the client asks again from where it ends), in both stores alike."""
    import nodes.plugins.memory as memory

    sparse, shared = SparseStore(), SharedStore(SIZE)
    for index in range(0, 16, 2):
        sparse.write(memoryview(b"x"), index * PAGE)
        shared.write(memoryview(b"x"), index * PAGE)
    everything, few = sparse.extents(SIZE - 100, 100), sparse.extents(3 * PAGE, 100)
    assert (len(everything), len(few)) == (16, 4)
    monkeypatch.setattr(memory, "MAX_EXTENTS", 5)
    for store in (sparse, shared):
        assert store.extents(SIZE - 100, 100) == everything[:5]
        assert store.extents(3 * PAGE, 100) == few


def test_shared_store_is_shared_with_a_forked_process() -> None:
    store = SharedStore(4 * PAGE)
    pid = os.fork()
    if pid == 0:  # the child writes; the parent must see it
        try:
            store.write(memoryview(b"from the child"), PAGE + 5)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert data(store.lend_read(14, PAGE + 5)) == b"from the child"
    assert store.allocated_pages() == 1


def test_shared_store_refuses_disks_beyond_its_address_space() -> None:
    import pytest

    with pytest.raises(ValueError, match="at most"):
        SharedStore(SharedStore.MAX_SIZE + 1)


# Landing: big WRITE payloads received straight into pages -------------------------------------


def fill(landing, payload: bytes) -> None:
    """What the socket does to a landing: its views take the payload in order."""
    pos = 0
    for view in landing.views:
        view[:] = payload[pos : pos + len(view)]
        pos += len(view)
    assert pos == len(payload)


landing_op = st.one_of(
    op,
    st.tuples(st.sampled_from(["land", "land-released"]), span, st.integers(0, 255)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(landing_op, max_size=25), span)
def test_a_committed_landing_is_a_write_and_a_released_one_is_nothing(ops, probe) -> None:
    """Landed writes (whole pages swapped in, partial ones copied) read back as writes do,
    beside plain writes and zeroing; a landing never committed changes nothing. Pages it
    replaced are reused by later landings, even while reads of earlier ones are lent out."""
    store, model = SparseStore(), bytearray(SIZE)
    states: list[bytes] = []  # the disk after each step
    lent: list[tuple[int, int, list]] = []  # reads lent out: at which step, where, the pieces
    for kind, (offset, length), arg in ops:
        payload = bytes([arg]) * length
        if kind == "write":
            store.write(memoryview(payload), offset)
            model[offset : offset + length] = payload
        elif kind == "zero":
            store.zero(length, offset, punch=arg)
            model[offset : offset + length] = bytes(length)
        else:
            landing = store.land(length, offset)
            fill(landing, payload)
            if kind == "land":
                landing.commit()
                model[offset : offset + length] = payload
            landing.release()
        states.append(bytes(model))
        lent.append((len(states) - 1, offset, store.lend_read(min(PAGE, SIZE - offset), offset)))
    # A reply still being sent shows, piece by piece, its offset's bytes as they were at some
    # step since its read (writes in place show through), never another offset's.
    for step, offset, pieces in lent:
        pos = offset
        for piece in pieces:
            n = piece if isinstance(piece, int) else len(piece)
            if not isinstance(piece, int):
                assert any(bytes(piece) == state[pos : pos + n] for state in states[step:])
            pos += n
    offset, length = probe
    assert data(store.lend_read(length, offset)) == bytes(model[offset : offset + length])
    assert data(store.lend_read(SIZE, 0)) == bytes(model)


def test_a_page_a_lent_read_shows_is_not_landed_into_again() -> None:
    """A reply not yet sent shows a view of a page; a landing replaces that page, and the next
    landing elsewhere must not fill it (the reply would then send another offset's bytes)."""
    store = SparseStore()
    store.write(memoryview(b"a" * PAGE), 0)
    reply = store.lend_read(PAGE, 0)  # held, as by a socket that has not taken it yet
    for offset, byte in ((0, b"b"), (4 * PAGE, b"c"), (8 * PAGE, b"d")):
        landing = store.land(PAGE, offset)
        fill(landing, byte * PAGE)
        landing.commit()
    assert data(reply) == b"a" * PAGE
    assert data(store.lend_read(PAGE, 0)) == b"b" * PAGE
    del reply  # sent: the page it showed may now be landed into
    landing = store.land(PAGE, 12 * PAGE)
    fill(landing, b"e" * PAGE)
    landing.commit()
    assert [data(store.lend_read(PAGE, i * PAGE))[:1] for i in (0, 4, 8, 12)] == [
        b"b",
        b"c",
        b"d",
        b"e",
    ]
