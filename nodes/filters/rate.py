"""rate: limit bandwidth with token buckets (nbdkit-rate-filter, plus per-client limits).

Reads and writes spend tokens, one per byte; each direction has its own buckets (as nbdkit: the
limit applies to reads and to writes separately). Up to three limits apply at once, and a request
waits for the slowest: `rate` for the node as a whole, `connection-rate` for each connection,
`client-rate` for each client address (all connections from one host share it; unix-socket
clients count as one client). Zero, trim, flush and block-status carry no payload: they are free.

Large requests move in slices of about 0.1 s worth of bandwidth each, so data keeps flowing
upstream at the limit instead of one long sleep followed by a burst. Buckets start empty; an idle
bucket fills up to `burstiness` seconds worth of tokens, which a client may then spend at once.

Rates are **bytes per second** (nbdfabric's unit, unlike nbdkit's bits): `2M`, `512K`, `2MiB/s`;
a `bps`/`bit` suffix gives bits per second as nbdkit reads them (`16Mbps` = `2M`).
All params are live. `rate-file`/`connection-rate-file`/`client-rate-file` hold a rate that is
re-read when the file changes (nbdkit's dynamic adjustment; a deleted file keeps the last value).

Params: `rate`, `connection-rate`, `client-rate`, `burstiness` (seconds, default 2),
`burst` (bucket capacity in bytes; overrides burstiness), `rate-file`, `connection-rate-file`,
`client-rate-file`.

Example: `nbdfabric node rate rate=10M client-rate=2M --upstream URI`
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from ..base import Backend, Filter, Holes, add_range, current_client
from ..params import Duration, Params, Size, live
from ..registry import register
from ..values import parse_size

#: A slice is at most this many seconds' worth of the tightest applicable rate.
SLICE_SECONDS = 0.1
MIN_SLICE = 4096
MAX_SLICE = 8 * 1024 * 1024
#: Rate files are looked at no more often than this.
FILE_CHECK_INTERVAL = 0.05

_BITS_RE = re.compile(r"^\s*(.*?)\s*(bps|bit/s|bits/s|bits|bit)\s*$", re.IGNORECASE)
_PER_SECOND_RE = re.compile(r"^\s*(.*?)\s*(b/s|/s)\s*$", re.IGNORECASE)


def parse_rate(value: Any) -> int:
    """Bytes per second from `2M`, `2MiB/s`, `1048576`, or bits from `16Mbps`, `8Mbit`."""
    if isinstance(value, bool):
        raise ValueError("expected a rate like 2M (bytes/s) or 16Mbps")
    if isinstance(value, float):
        # YAML's .inf made int() raise OverflowError out of validation, -0.5 became 0 (off)
        if not math.isfinite(value) or value < 0:
            raise ValueError("a rate must be a finite number of bytes/s, 0 or more")
        value = int(value)
    if isinstance(value, int):
        return parse_size(value)  # the range check of every size: negative rates are refused
    text = str(value)
    bits = _BITS_RE.match(text)
    if bits:
        return parse_size(bits.group(1)) // 8
    per_second = _PER_SECOND_RE.match(text)
    if per_second:
        text = per_second.group(1)
        if text[-1:] in ("i", "I"):  # 2MiB/s: the B went with the /s
            text += "B"
    try:
        return parse_size(text)
    except ValueError:
        raise ValueError("expected a rate like 2M, 512K (bytes/s) or 16Mbps (bits/s)") from None


Bandwidth = Annotated[int, BeforeValidator(parse_rate), Field(json_schema_extra={"format": "size"})]


class RateParams(Params):
    rate: Bandwidth | None = live(None, "bytes/s for the whole node, per direction (0: no limit)")
    connection_rate: Bandwidth | None = live(None, "bytes/s for each connection, per direction")
    client_rate: Bandwidth | None = live(None, "bytes/s for each client address, per direction")
    burstiness: Duration = live(2.0, "seconds of bandwidth an idle bucket may save up")
    burst: Size | None = live(None, "bucket capacity in bytes (overrides burstiness)")
    rate_file: str | None = live(
        None, "file holding the node rate; re-read when it changes", path=True
    )
    connection_rate_file: str | None = live(None, "file holding the connection rate", path=True)
    client_rate_file: str | None = live(None, "file holding the client rate", path=True)


class Bucket:
    """A token bucket that lends: a taker reserves now and sleeps off its debt, so concurrent
    requests queue fairly in arrival order without a lock."""

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.level = 0.0
        self.stamp = now

    def reserve(self, n: int, now: float) -> float:
        """Take `n` tokens; return how long to wait until they are really there."""
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        self.level -= n
        return -self.level / self.rate if self.level < 0 else 0.0


@dataclass
class _RateFile:
    path: str
    mtime: float = -1.0
    value: int | None = None
    checked: float = 0.0


SCOPES = ("rate", "connection_rate", "client_rate")


@register
class Rate(Filter):
    """Limits read and write bandwidth per node, per connection and per client address."""

    kind = "rate"
    passes_contexts = True  #: meta contexts pass through (see Filter)
    Params = RateParams
    params: RateParams

    def __init__(self, params: RateParams, next: Backend) -> None:
        super().__init__(params, next)
        #: (scope, key, direction) -> bucket; key is None, a connection id or a host.
        self.buckets: dict[tuple[str, object, str], Bucket] = {}
        self._files: dict[str, _RateFile] = {}
        self.waited = 0.0  #: seconds requests spent waiting for tokens, in total

    def status(self) -> dict[str, Any]:
        rates = {scope.replace("_", "-"): self._rate(scope) for scope in SCOPES}
        return {
            **self.next.status(),
            "rates": rates,
            "buckets": len(self.buckets),
            "waited_seconds": round(self.waited, 6),
        }

    async def close_connection(self) -> None:
        conn = current_client.get().connection_id
        for key in [k for k in self.buckets if k[0] == "connection_rate" and k[1] == conn]:
            del self.buckets[key]
        await self.next.close_connection()

    # Rates -----------------------------------------------------------------------------------

    def _rate(self, scope: str) -> int | None:
        """The current limit of a scope: its rate file's value if it has one, else the param."""
        path = getattr(self.params, f"{scope}_file")
        if path:
            value = self._read_file(path)
            if value is not None:
                return value or None
        value = getattr(self.params, scope)
        return value or None

    def _read_file(self, path: str) -> int | None:
        rf = self._files.get(path)
        if rf is None:
            rf = self._files[path] = _RateFile(path)
        now = time.monotonic()
        if now - rf.checked < FILE_CHECK_INTERVAL:
            return rf.value
        rf.checked = now
        with contextlib.suppress(OSError, ValueError):
            mtime = os.stat(path).st_mtime_ns
            if mtime != rf.mtime:
                with open(path) as f:
                    rf.value = parse_rate(f.read().strip())
                rf.mtime = mtime
        return rf.value

    def _limits(self, direction: str) -> list[tuple[tuple[str, object, str], int]]:
        client = current_client.get()
        out = []
        for scope in SCOPES:
            rate = self._rate(scope)
            if rate is None:
                continue
            key: object = None
            if scope == "connection_rate":
                key = client.connection_id
            elif scope == "client_rate":
                key = _host(client.address)
            out.append(((scope, key, direction), rate))
        return out

    def _capacity(self, rate: int) -> float:
        if self.params.burst is not None:
            return float(self.params.burst)
        return rate * self.params.burstiness

    async def _spend(self, limits: list[tuple[tuple[str, object, str], int]], n: int) -> None:
        now = time.monotonic()
        wait = 0.0
        for key, rate in limits:
            bucket = self.buckets.get(key)
            if bucket is None:
                bucket = self.buckets[key] = Bucket(rate, self._capacity(rate), now)
            elif bucket.rate != rate:  # a live change: keep the level, use the new rate
                bucket.rate, bucket.capacity = rate, self._capacity(rate)
            wait = max(wait, bucket.reserve(n, now))
        if wait > 0:
            self.waited += wait
            await asyncio.sleep(wait)

    def _slice(self, limits: list[tuple[tuple[str, object, str], int]]) -> int:
        align = max(MIN_SLICE, self.next.capabilities().block_min)
        slowest = min(rate for _, rate in limits)
        n = int(slowest * SLICE_SECONDS) // align * align
        return max(align, min(n, MAX_SLICE))

    # Data ------------------------------------------------------------------------------------

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        limits = self._limits("read")
        if not limits:
            return await self.next.pread(buf, offset, flags)
        step = self._slice(limits)
        holes: list[tuple[int, int]] = []
        for pos in range(0, len(buf), step):
            piece = buf[pos : pos + step]
            await self._spend(limits, len(piece))
            for start, length in await self.next.pread(piece, offset + pos, flags) or ():
                add_range(holes, pos + start, length)
        return holes

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        limits = self._limits("write")
        if not limits:
            await self.next.pwrite(buf, offset, flags)
            return
        step = self._slice(limits)
        for pos in range(0, len(buf), step):
            piece = buf[pos : pos + step]
            await self._spend(limits, len(piece))
            await self.next.pwrite(piece, offset + pos, flags)


def _host(address: str) -> str:
    """`1.2.3.4:567` -> `1.2.3.4`, `[::1]:567` -> `::1`; anything else as it is."""
    if address.startswith("["):
        return address[1 : address.find("]")] if "]" in address else address
    host, sep, port = address.rpartition(":")
    return host if sep and port.isdigit() else address
