"""Adaptive polling before the event loop sleeps (`nbdfabric node --poll-max-us N`).

A client at queue depth 1 sends its next request a few tens of µs after our reply. By then the
node's event loop has gone to sleep, and waking it is slow: on a VM whose idle vCPU halts at once
it costs a VM exit, and the node then runs on cold caches (bench/RESULTS.md: about 12 µs of a
60 µs round trip on this project's machine). QEMU's event loop meets this by polling before it
sleeps (IOThread `poll-max-ns`); so does this, the same way:

- after the work an event brought, the node checks its sockets (clients' and upstreams', watched
  by one epoll of its own) for up to `ns` before the loop blocks;
- `ns` adapts as QEMU's does: when the loop, having stopped polling, waits no longer than the
  maximum for its next event, `ns` doubles (from 4 µs) up to the maximum; when it waits longer,
  `ns` halves (to 0 below 4 µs). A steady stream of short gaps is polled for; an idle node stops
  polling after a few events.

It trades CPU for latency: under a steady QD1 load the node keeps a core busy. Off by default.
Runs on the event loop's thread: the loop is blocked while polling, at most `ns` at a time, and
stops at once when any watched socket becomes readable.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import time

#: Where the poll time starts when it first grows (QEMU's default too).
START_NS = 4000


class Poller:
    def __init__(self) -> None:
        self.max_ns = 0
        self.ns = 0  #: the current poll time
        self.hits = 0  #: polls that found an event
        self.misses = 0  #: polls that ran out of time (the loop then slept)
        self._epoll: select.epoll | None = None
        self._scheduled = False
        self._idle_since = 0  #: when the loop last went to sleep after a miss (0: awake)
        self._watched: set[int] = set()  #: the fds registered with _epoll

    @property
    def enabled(self) -> bool:
        return self._epoll is not None

    def configure(self, max_us: int) -> None:
        """Poll for up to `max_us` µs before sleeping; 0 turns polling off."""
        if max_us < 0:
            raise ValueError(f"--poll-max-us must be 0 or more, not {max_us}")
        self.max_ns = max_us * 1000
        self.ns = 0
        if max_us and self._epoll is None:
            self._epoll = select.epoll()
        elif not max_us and self._epoll is not None:
            self._epoll.close()
            self._epoll = None
            self._watched.clear()

    def watch(self, fd: int) -> None:
        """Count `fd` readable as an event worth staying awake for (a client or upstream socket)."""
        if self._epoll is not None:
            try:
                self._epoll.register(fd, select.EPOLLIN)
            except FileExistsError:  # a reused fd number whose old entry is still there
                self._epoll.modify(fd, select.EPOLLIN)
            self._watched.add(fd)

    def unwatch(self, fd: int) -> None:
        """Before `fd` closes (a duplicate of it may stay open, and its entry with it)."""
        if self._epoll is not None:
            self._watched.discard(fd)
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    def woke(self) -> None:
        """An event on a watched socket is being handled: adapt to how long the loop slept."""
        if self._idle_since:
            self._adapt(time.monotonic_ns() - self._idle_since)
            self._idle_since = 0

    def idle_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        """The work an event brought is done or queued: poll once the loop has run it."""
        if self._epoll is not None and not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._poll)

    def _poll(self) -> None:
        self._scheduled = False
        epoll = self._epoll
        if epoll is None:
            return
        if self.ns:
            clock = time.monotonic_ns
            end = clock() + self.ns
            while True:
                if epoll.poll(0):
                    self.hits += 1
                    return  # the loop finds the event ready: no sleep, nothing to adapt
                if clock() >= end:
                    break
            self.misses += 1
        self._idle_since = time.monotonic_ns()

    def _adapt(self, slept_ns: int) -> None:
        if slept_ns <= self.ns:
            return  # polling longer would not have helped
        if slept_ns > self.max_ns:
            self.ns //= 2
            if self.ns < START_NS:
                self.ns = 0
        else:
            self.ns = min(max(self.ns * 2, START_NS), self.max_ns)

    def info(self) -> dict[str, int]:
        return {
            "max_ns": self.max_ns,
            "ns": self.ns,
            "hits": self.hits,
            "misses": self.misses,
            "sockets": len(self._watched),
        }


#: One per process: every session and upstream of a node registers with it.
POLLER = Poller()
