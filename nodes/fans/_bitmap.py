"""Dirty-region maps for redundant fans: which chunks of a member must be copied before it is
in sync again, and the write-intent bitmap file that keeps them across a restart of the fan.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any


class DirtyMap:
    """Chunks of one member that differ (or may differ) from the array.

    A full rebuild is a cursor (`full_from`: every chunk from there on is dirty) so that a new
    member of a large disk costs no memory; other dirty chunks are a set.
    """

    def __init__(self, nchunks: int) -> None:
        self.nchunks = nchunks
        self.full_from: int | None = None
        self.bits: set[int] = set()

    def mark(self, first: int, last: int) -> bool:
        """Mark chunks first..last (inclusive); True if anything new became dirty."""
        limit = self.full_from if self.full_from is not None else self.nchunks
        last = min(last, limit - 1)
        if last - first > 4096 and last == limit - 1:
            # A huge range up to the end (or the cursor): cheaper as the cursor.
            return self.mark_from(first)
        before = len(self.bits)
        self.bits.update(range(first, last + 1))
        return len(self.bits) != before

    def mark_many(self, chunks: set[int]) -> bool:
        if self.full_from is not None:
            chunks = {c for c in chunks if c < self.full_from}
        before = len(self.bits)
        self.bits.update(chunks)
        return len(self.bits) != before

    def mark_from(self, first: int) -> bool:
        if self.full_from is not None and self.full_from <= first:
            return False
        self.full_from = first
        self.bits = {b for b in self.bits if b < first}
        return True

    def mark_all(self) -> bool:
        return self.mark_from(0)

    def discard(self, first: int, last: int) -> None:
        if self.full_from is not None and first <= self.full_from <= last + 1:
            self.full_from = last + 1 if last + 1 < self.nchunks else None
        if len(self.bits) < last - first:
            self.bits = {b for b in self.bits if not first <= b <= last}
        else:
            self.bits.difference_update(range(first, last + 1))

    def is_dirty(self, chunk: int) -> bool:
        return chunk in self.bits or (self.full_from is not None and chunk >= self.full_from)

    def count(self) -> int:
        full = self.nchunks - self.full_from if self.full_from is not None else 0
        return len(self.bits) + full

    def is_full(self) -> bool:
        return self.full_from == 0

    def clear(self) -> None:
        self.full_from = None
        self.bits = set()

    def runs(self, max_run: int) -> Iterator[tuple[int, int]]:
        """Dirty (first, last) runs in ascending order, each at most `max_run` chunks.

        The set is walked from a sorted snapshot (chunks cleaned meanwhile are skipped); the
        full-rebuild cursor is read live. A caller loops until `count()` is 0 to pick up chunks
        dirtied while it walked.
        """
        snapshot = sorted(self.bits)
        i, pos = 0, 0
        while True:
            while i < len(snapshot) and (snapshot[i] < pos or snapshot[i] not in self.bits):
                i += 1
            first = snapshot[i] if i < len(snapshot) else None
            if self.full_from is not None:
                cursor = max(self.full_from, pos)
                if cursor < self.nchunks and (first is None or cursor < first):
                    first = cursor
            if first is None:
                return
            last = first
            while (
                last + 1 < self.nchunks and last + 1 - first < max_run and self.is_dirty(last + 1)
            ):
                last += 1
            yield first, last
            pos = last + 1

    # Persistence as runs, so a full map is one pair ------------------------------------------

    def to_json(self) -> dict[str, Any]:
        runs: list[list[int]] = []
        for b in sorted(self.bits):
            if runs and runs[-1][1] == b - 1:
                runs[-1][1] = b
            else:
                runs.append([b, b])
        return {"full_from": self.full_from, "runs": runs}

    def load_json(self, data: dict[str, Any]) -> None:
        self.clear()
        for first, last in data.get("runs", []):
            self.bits.update(range(int(first), int(last) + 1))
        if data.get("full_from") is not None:
            self.mark_from(int(data["full_from"]))


class BitmapFile:
    """The write-intent bitmap on disk: JSON, replaced atomically, written before the write
    that dirtied a region is sent (so a crash of the fan never loses a dirty mark)."""

    def __init__(self, path: str) -> None:
        self.path = path
        #: Saves come from the event loop and from worker threads (a fan's writes save off
        #: the loop): one at a time, and never an older state over a newer one.
        self._lock = threading.Lock()
        self._saved = 0  #: the generation on disk

    def load(self) -> dict[str, Any] | None:
        try:
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ValueError(f"bitmap file {self.path}: unreadable ({exc})") from exc
        return data if isinstance(data, dict) else None

    def save(self, data: dict[str, Any], generation: int = 0) -> None:
        """Write DATA, the state as of GENERATION (numbered by the caller as it takes them, in
        order; 0: always written). A state older than the one on disk is not written: the
        newer one holds what it said, or what came after."""
        with self._lock:
            if generation and generation <= self._saved:
                return
            tmp = f"{self.path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self._saved = max(self._saved, generation)


class WriteIntents:
    """Regions of an array with writes in flight, as md's write-intent bitmap: a region is
    marked (and the caller saves the mark) before the first write into it goes out, and stays
    marked until it has had no write in flight, and none unflushed, for a while. After a crash
    of the fan the marked regions are the only places where members may disagree (one has a
    write, another not), so they are all a restarted fan must bring back in step.

    Positions are in the array's units (a mirror's bitmap chunks, a parity array's stripes,
    `unit` bytes on a member); a region is `region` bytes, rounded up to whole units.
    """

    def __init__(self, region: int, unit: int, units: int) -> None:
        self.per_region = max(1, -(-region // unit))
        self.units = units
        self._marked: dict[int, float] = {}  #: region -> when its last write ended
        self._writing: dict[int, int] = {}  #: region -> writes in flight

    def begin(self, first: int, last: int) -> tuple[range, bool]:
        """A write into units first..last is about to go out: its regions (for `end`), and
        whether one was not marked yet (then save the marks before sending it)."""
        regions = range(first // self.per_region, last // self.per_region + 1)
        new = False
        for r in regions:
            self._writing[r] = self._writing.get(r, 0) + 1
            if r not in self._marked:
                self._marked[r] = 0.0
                new = True
        return regions, new

    def end(self, regions: range) -> None:
        now = time.monotonic()
        for r in regions:
            left = self._writing[r] - 1
            if left:
                self._writing[r] = left
            else:
                del self._writing[r]
            self._marked[r] = now

    def settle(self, linger: float, unflushed: Iterable[int] = ()) -> bool:
        """Unmark regions quiet for LINGER seconds with no write in flight and none of the
        UNFLUSHED units; True if any was (save then)."""
        if not self._marked:
            return False
        horizon = time.monotonic() - linger
        busy = {u // self.per_region for u in unflushed}
        quiet = [r for r, t in self._marked.items()
                 if t < horizon and r not in self._writing and r not in busy]  # fmt: skip
        for r in quiet:
            del self._marked[r]
        return bool(quiet)

    def runs(self) -> list[list[int]]:
        """The marked regions as [first, last] runs of units, so that a saved file does not
        depend on the region size."""
        out: list[list[int]] = []
        for r in sorted(self._marked):
            first = r * self.per_region
            last = min(first + self.per_region, self.units) - 1
            if out and out[-1][1] == first - 1:
                out[-1][1] = last
            else:
                out.append([first, last])
        return out


def load_runs(value: Any, units: int) -> list[tuple[int, int]]:
    """[first, last] runs read back from a state file, clipped to the array."""
    runs = []
    for first, last in value or []:
        first, last = int(first), min(int(last), units - 1)
        if 0 <= first <= last:
            runs.append((first, last))
    return runs
