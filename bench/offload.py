"""What handing a blocking call to a thread costs: `asyncio.to_thread` against
nodes.offload.run_blocking, on uvloop as the nodes run, for a call that does nothing.

    python -m bench.offload [--calls 20000] [--depth 1,4,16]

Prints, per way and per number of calls in flight at once, the wall time and the CPU time
(user + kernel, all threads) per call.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time
from collections.abc import Awaitable, Callable

import uvloop

from nodes.offload import run_blocking


def _nothing() -> None:
    pass


async def _measure(
    way: Callable[[Callable[[], None]], Awaitable[None]], calls: int, depth: int
) -> tuple[float, float]:
    """(wall µs, CPU µs) per call, `depth` calls in flight at a time."""
    await asyncio.gather(*(way(_nothing) for _ in range(depth)))  # threads started
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    for _ in range(calls // depth):
        await asyncio.gather(*(way(_nothing) for _ in range(depth)))
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    n = calls // depth * depth
    return wall / n * 1e6, cpu / n * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.offload", description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--depth", default="1,4,16", help="calls in flight at once (comma list)")
    args = p.parse_args(argv)
    ways = {"asyncio.to_thread": asyncio.to_thread, "run_blocking": run_blocking}
    for depth in (int(d) for d in args.depth.split(",")):
        for name, way in ways.items():
            wall, cpu = uvloop.run(_measure(way, args.calls, depth))
            print(f"depth {depth:>3}  {name:<18} {wall:7.1f} µs/call wall  {cpu:7.1f} µs/call CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
