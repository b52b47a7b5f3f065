"""Live counters of a node: per operation count, bytes, errors and a latency histogram.

The server records every request here; the control plane (gRPC stats, Prometheus) reads it.
Recording is a few integer additions: it runs on the hot path.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from typing import Any

#: Upper bounds (seconds) of the latency buckets; the last bucket is +Inf.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

OPS = ("read", "write", "flush", "trim", "cache", "zero", "block_status")


@dataclass(slots=True)
class OpStats:
    count: int = 0
    bytes: int = 0
    errors: int = 0
    latency_sum: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))

    def record(self, nbytes: int, seconds: float, error: bool) -> None:
        self.count += 1
        self.bytes += nbytes
        self.latency_sum += seconds
        if error:
            self.errors += 1
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "bytes": self.bytes,
            "errors": self.errors,
            "latency_sum": self.latency_sum,
            "buckets": list(self.buckets),
        }


@dataclass
class NodeStats:
    ops: dict[str, OpStats] = field(default_factory=lambda: {op: OpStats() for op in OPS})
    connections_total: int = 0
    connections_open: int = 0
    in_flight: int = 0
    protocol_errors: int = 0
    started: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ops": {name: op.as_dict() for name, op in self.ops.items()},
            "connections_total": self.connections_total,
            "connections_open": self.connections_open,
            "in_flight": self.in_flight,
            "protocol_errors": self.protocol_errors,
            "uptime": time.time() - self.started,
            "latency_buckets": list(LATENCY_BUCKETS),
        }
