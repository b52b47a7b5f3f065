"""stats: count operations, bytes, errors and latency (nbdkit-stats-filter, readable live).

Per operation (read, write, trim, zero, extents, cache, flush): requests, bytes, errors, time
spent, a latency histogram (mean, p50, p90, p99 estimated from it), and request size/alignment
breakdowns as nbdkit prints them. The numbers are readable at any time: through `status()` (the
gRPC info of the node) and in `statsfile`, which is rewritten every `statsinterval` while the
node serves and once more when it stops. As a middle filter it measures what the node below it
costs, seen from here.

Params:
- `statsfile=PATH`: where to write (without it the stats are only in `status()`).
- `statsappend` (yes|no, default no): append one report per write instead of replacing the file.
- `statsinterval` (duration, e.g. `1s`; default: only at stop): rewrite the file this often.
- `statsformat` (text|json, default text): nbdkit-like text, or one JSON object.
- `statsthreshold` (percent, default 95): size/alignment histograms show the most common
  request sizes up to this share of requests (0 turns them off).

Example: `nbdfabric node stats statsfile=/tmp/stats.json statsformat=json statsinterval=1s
--upstream URI`
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from ..base import Backend, Extents, Filter, Holes
from ..params import Duration, Params, live, param
from ..registry import register
from ..stats import LATENCY_BUCKETS, OpStats

T = TypeVar("T")
OPS = ("read", "write", "trim", "zero", "extents", "cache", "flush")


class StatsParams(Params):
    statsfile: str | None = param(None, "file to write the statistics to", path=True)
    statsappend: bool = param(False, "append each report instead of replacing the file")
    statsinterval: Duration | None = live(None, "rewrite the file this often while serving")
    statsformat: Literal["text", "json"] = live("text", "text (nbdkit-like) or json")
    statsthreshold: int = live(95, "percent of requests the size histograms cover", ge=0, le=100)


@dataclass
class OpRecord(OpStats):
    """OpStats plus nbdkit's request size (bits) and offset alignment (trailing zeros) counts."""

    sizes: Counter[int] = field(default_factory=Counter)
    aligned: dict[int, Counter[int]] = field(default_factory=dict)

    def shape(self, count: int, offset: int) -> None:
        bits = count.bit_length()
        self.sizes[bits] += 1
        zeros = (offset & -offset).bit_length() - 1 if offset else 64
        self.aligned.setdefault(bits, Counter())[zeros] += 1


def percentile(buckets: list[int], q: float) -> float:
    """Upper bound of the latency bucket holding quantile q (inf if in the last bucket)."""
    total = sum(buckets)
    if not total:
        return 0.0
    rank, seen = q * total, 0
    for i, n in enumerate(buckets):
        seen += n
        if seen >= rank and n:
            return LATENCY_BUCKETS[i] if i < len(LATENCY_BUCKETS) else float("inf")
    return float("inf")


def human(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


@register
class Stats(Filter):
    """Counts requests, bytes, errors and latency per operation; live and in a file."""

    kind = "stats"
    passes_contexts = True  #: meta contexts pass through (see Filter)
    Params = StatsParams
    params: StatsParams

    def __init__(self, params: StatsParams, next: Backend) -> None:
        super().__init__(params, next)
        self.ops = {op: OpRecord() for op in OPS}
        self.started = time.time()
        self.connections = 0
        self._task: asyncio.Task[None] | None = None
        self._first_write = True

    async def start(self) -> None:
        await self.next.start()
        self.started = time.time()
        self._task = asyncio.get_running_loop().create_task(self._rewrite_loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.write_file()
        await self.next.stop()

    async def _rewrite_loop(self) -> None:
        while True:
            interval = self.params.statsinterval  # live: re-read each round
            await asyncio.sleep(interval or 0.5)
            if interval:
                try:
                    self.write_file()
                except OSError:
                    pass  # a full disk must not stop the node; the next round tries again

    async def open_connection(self) -> None:
        self.connections += 1
        await self.next.open_connection()

    # Reporting -------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        elapsed = max(time.time() - self.started, 1e-9)
        ops: dict[str, Any] = {}
        for name, rec in self.ops.items():
            entry = rec.as_dict()
            entry["latency_mean"] = rec.latency_sum / rec.count if rec.count else 0.0
            for q in (50, 90, 99):
                entry[f"latency_p{q}"] = percentile(rec.buckets, q / 100)
            entry["sizes"] = {str(b): n for b, n in sorted(rec.sizes.items())}
            ops[name] = entry
        total_ops = sum(r.count for r in self.ops.values())
        total_bytes = sum(r.bytes for r in self.ops.values())
        return {
            "elapsed": elapsed,
            "connections": self.connections,
            "total": {
                "count": total_ops,
                "bytes": total_bytes,
                "errors": sum(r.errors for r in self.ops.values()),
                "seconds": sum(r.latency_sum for r in self.ops.values()),
            },
            "ops": ops,
            "latency_buckets": list(LATENCY_BUCKETS),
        }

    def status(self) -> dict[str, Any]:
        return {**self.next.status(), "stats": self.snapshot()}

    def render_text(self) -> str:
        snap = self.snapshot()
        elapsed = snap["elapsed"]
        t = snap["total"]
        lines = [
            f"total: {t['count']} ops, {t['seconds']:.6f} s, {human(t['bytes'])}, "
            f"{human(t['bytes'] / elapsed)}/s, {t['errors']} errors"
        ]
        for name, rec in self.ops.items():
            if not rec.count:
                continue
            per_op = rec.bytes / rec.latency_sum if rec.latency_sum else 0.0
            lines.append(
                f"{name}: {rec.count} ops, {rec.latency_sum:.6f} s, {human(rec.bytes)}, "
                f"{human(per_op)}/s op, {human(rec.bytes / elapsed)}/s total, "
                f"{rec.errors} errors"
            )
            e = snap["ops"][name]
            lines.append(
                f"  latency: mean {e['latency_mean'] * 1e3:.3f} ms, p50 <= "
                f"{e['latency_p50'] * 1e3:g} ms, p90 <= {e['latency_p90'] * 1e3:g} ms, "
                f"p99 <= {e['latency_p99'] * 1e3:g} ms"
            )
            lines.extend(self._histogram(rec))
        return "\n".join(lines) + "\n"

    def _histogram(self, rec: OpRecord) -> list[str]:
        threshold = self.params.statsthreshold / 100
        if not threshold or not rec.sizes:
            return []
        out = ["  Request size and alignment breakdown:"]
        shown = 0
        for bits, n in rec.sizes.most_common():
            if shown / rec.count >= threshold:
                out.append(f"    other sizes: {(rec.count - shown) / rec.count:5.1%}")
                break
            shown += n
            out.append(f"    {bits} bits: {n / rec.count:5.1%} ({n} reqs)")
            aligned = rec.aligned.get(bits, Counter())
            at_least = 0
            for zeros in sorted(aligned, reverse=True):
                at_least += aligned[zeros]
                if zeros < 64:
                    out.append(f"         {zeros} bit aligned: {at_least / n:5.1%} ({at_least})")
        return out

    def write_file(self) -> None:
        path = self.params.statsfile
        if not path:
            return
        if self.params.statsformat == "json":
            text = json.dumps(self.snapshot()) + "\n"
        else:
            text = self.render_text()
        if self.params.statsappend:
            with open(path, "a") as f:
                f.write(text)
            return
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)  # readers never see half a report

    # Data ------------------------------------------------------------------------------------

    async def _timed(self, op: str, offset: int, count: int, call: Callable[[], Awaitable[T]]) -> T:
        rec = self.ops[op]
        started = time.perf_counter()
        failed = True
        try:
            result = await call()
            failed = False
            return result
        finally:
            # Bytes as nbdkit counts them: the range of every successful request.
            rec.record(0 if failed else count, time.perf_counter() - started, failed)
            if op != "flush":
                rec.shape(count, offset)

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        return await self._timed(
            "read", offset, len(buf), lambda: self.next.pread(buf, offset, flags)
        )

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        await self._timed("write", offset, len(buf), lambda: self.next.pwrite(buf, offset, flags))

    async def trim(self, count: int, offset: int, flags: int) -> None:
        await self._timed("trim", offset, count, lambda: self.next.trim(count, offset, flags))

    async def zero(self, count: int, offset: int, flags: int) -> None:
        await self._timed("zero", offset, count, lambda: self.next.zero(count, offset, flags))

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        return await self._timed(
            "extents", offset, count, lambda: self.next.extents(count, offset, flags)
        )

    async def context_extents(self, context: str, count: int, offset: int, flags: int) -> Extents:
        return await self._timed(
            "extents",
            offset,
            count,
            lambda: self.next.context_extents(context, count, offset, flags),
        )

    async def cache(self, count: int, offset: int, flags: int) -> None:
        await self._timed("cache", offset, count, lambda: self.next.cache(count, offset, flags))

    async def flush(self, flags: int) -> None:
        await self._timed("flush", 0, 0, lambda: self.next.flush(flags))
