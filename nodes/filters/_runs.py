"""RunMap: sorted, disjoint runs of integers (block numbers) mapped to small int values, so a
filter can mark a range of any length in one step and find what lies in a range by looking
only at the runs inside it. Standard library only (bisect), no I/O.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Iterator


def union(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Inclusive [first, last] ranges as their union: sorted, overlapping and adjacent ones
    joined."""
    out: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if out and first <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], last))
        else:
            out.append((first, last))
    return out


#: A run: [start, stop) and its value.
Run = tuple[int, int, int]


class RunMap:
    """Runs [start, stop) -> value; neighbours that touch and have the same value are one run.

    The runs are kept in chunks of at most 2 * LOAD (three parallel lists each: starts, stops,
    values), found through the first start of each chunk: marking a run moves the items of one
    chunk, not of the whole map, however many runs there are (a plain sorted list would move
    megabytes for one block written among a million runs)."""

    LOAD = 256

    def __init__(self) -> None:
        self._starts: list[list[int]] = []
        self._stops: list[list[int]] = []
        self._values: list[list[int]] = []
        self._firsts: list[int] = []  # _starts[i][0] of each (never empty) chunk
        self._count = 0

    def __len__(self) -> int:
        """The number of runs."""
        return self._count

    def _locate(self, x: int) -> tuple[int, int]:
        """(chunk, index) of the first run that ends after `x` (index may be the chunk's
        length: after the last run)."""
        ci = max(bisect_right(self._firsts, x) - 1, 0)
        j = bisect_right(self._stops[ci], x)
        if j == len(self._stops[ci]) and ci + 1 < len(self._stops):
            return ci + 1, 0
        return ci, j

    def get(self, x: int) -> int | None:
        """The value of the run holding `x`, None if none does."""
        if not self._firsts:
            return None
        ci, j = self._locate(x)
        starts = self._starts[ci]
        if j < len(starts) and starts[j] <= x:
            return self._values[ci][j]
        return None

    def runs(self, lo: int, hi: int) -> Iterator[Run]:
        """The runs that overlap [lo, hi), in order, cut to it. The map must not change while
        this is being iterated."""
        if not self._firsts or lo >= hi:
            return
        ci, j = self._locate(lo)
        while ci < len(self._starts):
            starts, stops, values = self._starts[ci], self._stops[ci], self._values[ci]
            for k in range(j, len(starts)):
                start = starts[k]
                if start >= hi:
                    return
                yield max(start, lo), min(stops[k], hi), values[k]
            ci, j = ci + 1, 0

    def gaps(self, lo: int, hi: int) -> Iterator[tuple[int, int]]:
        """The parts of [lo, hi) that no run covers, in order (same rule as runs())."""
        pos = lo
        for start, stop, _ in self.runs(lo, hi):
            if start > pos:
                yield pos, start
            pos = stop
        if pos < hi:
            yield pos, hi

    def assign(self, lo: int, hi: int, value: int | None) -> list[Run]:
        """Give [lo, hi) the value (None: no run there) and return what it held before: the
        runs that overlapped it, cut to it. Costs the runs it replaces, not the range's length."""
        if lo >= hi:
            return []
        if not self._firsts:
            if value is not None:
                self._starts.append([lo])
                self._stops.append([hi])
                self._values.append([value])
                self._firsts.append(lo)
                self._count = 1
            return []
        starts_, stops_, values_ = self._starts, self._stops, self._values
        # Take out every run from the one touching lo to the one touching hi (neighbours that
        # only touch come out too, so they can merge with the new run).
        ci, j = self._locate(lo - 1)
        out: list[Run] = []
        c, at = ci, j
        while c < len(starts_):
            starts, n = starts_[c], len(starts_[c])
            k = bisect_right(starts, hi, at)
            out.extend(zip(starts[at:k], stops_[c][at:k], values_[c][at:k], strict=True))
            del starts[at:k], stops_[c][at:k], values_[c][at:k]
            if k < n:
                break
            c, at = c + 1, 0
        # What goes back in their place: the parts of the first and last ones outside [lo, hi)
        # and the new run, merged where they touch with equal values.
        new: list[Run] = []
        if out and out[0][0] < lo:
            new.append((out[0][0], lo, out[0][2]))
        if value is not None:
            new.append((lo, hi, value))
        if out and out[-1][1] > hi:
            new.append((hi, out[-1][1], out[-1][2]))
        merged: list[Run] = []
        for run in new:
            if merged and merged[-1][1] == run[0] and merged[-1][2] == run[2]:
                merged[-1] = (merged[-1][0], run[1], run[2])
            else:
                merged.append(run)
        starts_[ci][j:j] = [r[0] for r in merged]
        stops_[ci][j:j] = [r[1] for r in merged]
        values_[ci][j:j] = [r[2] for r in merged]
        self._count += len(merged) - len(out)
        # Chunks ci..c changed: drop the emptied ones, renew their first starts, split ci if
        # it grew too long.
        for i in range(min(c, len(starts_) - 1), ci - 1, -1):
            if starts_[i]:
                self._firsts[i] = starts_[i][0]
            else:
                del starts_[i], stops_[i], values_[i], self._firsts[i]
        if ci < len(starts_) and len(starts_[ci]) > 2 * self.LOAD:
            half = self.LOAD
            for lists in (starts_, stops_, values_):
                lists.insert(ci + 1, lists[ci][half:])
                del lists[ci][half:]
            self._firsts.insert(ci + 1, starts_[ci + 1][0])
        before: list[Run] = []
        for start, stop, v in out:
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                before.append((a, b, v))
        return before
