"""What client connections cost a node in memory: its RSS (/proc), with real libnbd clients.

An idle connection costs a node a few KiB of objects (session, transport, handshake state). Its
256 KiB read buffer used to be resident from the start (a zero-filled bytearray): 1,000 idle
clients held 256 MiB. The bound here, 64 KiB per connection on average, is far from both that
and what a connection costs now (some 7 KiB).
"""

from __future__ import annotations

from typing import Any

from conftest import nbd_connect, rss_kib

BOUND_KIB = 64
IDLE = 200  #: connections that connect, read a block, and idle


def read_a_block(h: Any) -> Any:
    """A client that looked at its disk and now waits (the node has framed a request)."""
    h.pread(4096, 0)
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
