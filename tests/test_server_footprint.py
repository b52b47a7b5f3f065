"""What client connections cost a node in memory: its RSS (/proc), with real libnbd clients.

An idle connection costs a node a few KiB of objects (session, transport, handshake state). Its
256 KiB read buffer used to be resident from the start (a zero-filled bytearray), and a buffer
that reads had reached stayed so: 1,000 idle clients held 256 MiB. The bound here, 64 KiB per
connection on average, is far from both that and what a connection costs now (some 7 KiB).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import nbd
import pytest
from conftest import nbd_connect, rss_kib, wait_for
from test_server_raw import Raw

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


HEADERS = 16  #: clients that each send a WRITE header and the first page of its payload
HEADER_WRITE = 16 * 1024 * 1024  #: the size each of them announces


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_footprint_a_write_header_costs_the_node_only_the_payload_that_came(
    start_node: Any, tmp_path: Path, kind: str
) -> None:
    """A WRITE's buffer costs memory as its payload arrives, not when its header does: each of
    16 clients sends the header of a 16 MiB write and 4 KiB of its payload, then waits. Before
    (and in nbdkit, whose buffers are zeroed too) that held 16 MiB per client, 256 MiB here;
    now a file node's pooled buffer is a lazy mapping and a memory node makes its landing's
    pages a window (1 MiB) at a time. Then the payloads go on, and every byte is read back."""
    size = HEADERS * HEADER_WRITE
    if kind == "memory":
        node = start_node("memory", str(size))
    else:
        disk = tmp_path / "disk.img"
        with disk.open("wb") as f:
            f.truncate(size)
        node = start_node("file", str(disk))
    before = rss_kib(node.pid)
    blob = os.urandom(HEADER_WRITE)

    def payload(i: int) -> bytes:
        return blob[i * 4096 :] + blob[: i * 4096]

    clients = []
    for i in range(HEADERS):
        r = Raw(node.socket)
        r.handshake()
        r.request(1, i * HEADER_WRITE, HEADER_WRITE, cookie=i + 1, payload=payload(i)[:4096])
        clients.append(r)
    # The node has read every header and page sent (not merely been sent them).
    wait_for(lambda: not any(r.unread() for r in clients), 20, "the node to read the headers")
    grown = rss_kib(node.pid) - before
    assert grown < HEADERS * 2 * 1024, f"{kind}: the node grew by {grown} KiB"
    for i, r in enumerate(clients):
        r.sock.sendall(payload(i)[4096:])
        assert r.reply()[:2] == (i + 1, 0)
        r.close()
    h = nbd_connect(node.uri)
    for i in range(HEADERS):
        got = h.pread(HEADER_WRITE, i * HEADER_WRITE)
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload(i)).digest(), i
    h.shutdown()
