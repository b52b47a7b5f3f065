"""What client connections cost a node in memory: its RSS (/proc), with real libnbd clients.

An idle connection costs a node a few KiB of objects (session, transport, handshake state). Its
256 KiB read buffer used to be resident from the start (a zero-filled bytearray), and a buffer
that reads had reached stayed so: 1,000 idle clients held 256 MiB. The bound here, 64 KiB per
connection on average, is far from both that and what a connection costs now (some 7 KiB).
"""

from __future__ import annotations

from typing import Any

import nbd
import pytest
from conftest import nbd_connect, rss_kib, wait_for

from nodes.server.node import IDLE_PAGES_SWEEP

BOUND_KIB = 64
IDLE = 200  #: connections that connect, read a block, and idle
BUSY = 100  #: connections that send a burst of writes, then idle
BURST, BURST_WRITE = 32, 64 * 1024  #: writes in flight at once, and their size: 2 MiB


def read_a_block(h: Any) -> Any:
    """A client that looked at its disk and now waits (the node has framed a request)."""
    h.pread(4096, 0)
    return h


def write_a_burst(h: Any) -> Any:
    """A client that wrote 2 MiB, 32 writes in flight at once, and now waits: enough to carry
    the node's read buffer through all its pages."""
    data = nbd.Buffer(BURST_WRITE)
    cookies = [h.aio_pwrite(data, i * BURST_WRITE) for i in range(BURST)]
    for cookie in cookies:
        while not h.aio_command_completed(cookie):
            h.poll(-1)
    return h


def test_footprint_idle_connections_cost_the_node_a_few_kib_each(start_node: Any) -> None:
    node = start_node("memory", "64M")
    read_a_block(nbd_connect(node.uri)).shutdown()  # once-only costs are not per connection
    before = rss_kib(node.pid)
    handles = [read_a_block(nbd_connect(node.uri)) for _ in range(IDLE)]
    per_connection = (rss_kib(node.pid) - before) / IDLE
    for h in handles:
        h.shutdown()
    assert per_connection < BOUND_KIB, f"{per_connection:.0f} KiB per idle connection"


def test_footprint_connections_that_went_idle_give_their_read_buffers_back(
    start_node: Any,
) -> None:
    """Within a few sweeps of the node's (IDLE_PAGES_SWEEP): no timing is asserted, only that
    the memory comes back."""
    node = start_node("memory", "64M")
    # The data lands in the same 2 MiB each time, and the payload buffers are pooled: only
    # what each connection keeps is counted.
    write_a_burst(nbd_connect(node.uri)).shutdown()
    before = rss_kib(node.pid)
    handles = [write_a_burst(nbd_connect(node.uri)) for _ in range(BUSY)]

    def per_connection() -> float:
        return (rss_kib(node.pid) - before) / BUSY

    try:
        wait_for(lambda: per_connection() < BOUND_KIB, 4 * IDLE_PAGES_SWEEP, interval=0.5)
    except TimeoutError:
        pytest.fail(f"{per_connection():.0f} KiB per connection gone idle, after some sweeps")
    finally:
        for h in handles:
            h.shutdown()
