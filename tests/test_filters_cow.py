"""RunMap: sorted runs of blocks with values, against a plain list of cells."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from nodes.filters._runs import RunMap

# RunMap ------------------------------------------------------------------------------------

SPAN = 200
assign_op = st.tuples(
    st.integers(0, SPAN - 1),
    st.sampled_from([1, 1, 2, 3, 7, 40, 150]),
    st.sampled_from([None, 0, 2, 3]),
)


def runs_of(cells: list[int | None], lo: int = 0, hi: int = SPAN) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for x in range(lo, hi):
        v = cells[x]
        if v is None:
            continue
        if out and out[-1][1] == x and out[-1][2] == v:
            out[-1] = (out[-1][0], x + 1, v)
        else:
            out.append((x, x + 1, v))
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(assign_op, max_size=60), st.sampled_from([1, 2, 3, 256]), st.integers(0, SPAN))
def test_runmap_behaves_like_a_list_of_cells(ops: list, load: int, probe: int) -> None:
    """Small chunk loads split and empty chunks at every step (256: the one the filter uses)."""
    runs, cells = RunMap(), [None] * SPAN
    runs.LOAD = load
    for lo, n, value in ops:
        hi = min(SPAN, lo + n)
        assert runs.assign(lo, hi, value) == runs_of(cells, lo, hi)  # what it held before
        cells[lo:hi] = [value] * (hi - lo)
        assert list(runs.runs(0, SPAN)) == runs_of(cells)  # merged: each run is maximal
        assert len(runs) == len(runs_of(cells))
    lo, hi = sorted((probe, (probe * 7) % (SPAN + 1)))
    assert list(runs.runs(lo, hi)) == runs_of(cells, lo, hi)
    uncovered = runs_of([0 if v is None else None for v in cells], lo, hi)
    assert list(runs.gaps(lo, hi)) == [(a, b) for a, b, _ in uncovered]
    assert [runs.get(x) for x in range(SPAN)] == cells


def test_runmap_marks_a_huge_range_in_one_run() -> None:
    runs = RunMap()
    for b in range(0, 3000, 2):
        runs.assign(b, b + 1, 0)
    before = runs.assign(1, 1 << 40, 3)  # over 1,499 runs and a trillion blocks
    assert len(before) == 1499 and all(v == 0 for _, _, v in before)
    assert list(runs.runs(0, 1 << 41)) == [(0, 1, 0), (1, 1 << 40, 3)]
    runs.assign(5000, 5001, 0)  # a mark inside the run splits it
    assert list(runs.runs(4999, 5002)) == [(4999, 5000, 3), (5000, 5001, 0), (5001, 5002, 3)]
    assert len(runs) == 4
