"""Prometheus metrics of a node, read from `runtime.stats` at scrape time (nothing is recorded
twice), served over HTTP on the node's event loop: `HOST:PORT` or `unix:PATH`, path `/metrics`.
A node with workers serves them from its control process, which reads a view of the workers'
counters summed (control/fanin.py) that it refreshes before each scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

from ..server.addresses import (
    Address,
    AddressError,
    bound_address,
    open_listener,
    parse_address,
    remove_socket_file,
)
from ..server.node import NodeRuntime
from ..stats import LATENCY_BUCKETS

log = logging.getLogger("nbdfabric.metrics")

STATES = ("starting", "serving", "paused", "draining", "stopped")
_LABELS = ["node", "kind", "export"]
_BOUNDS = [floatToGoString(b) for b in LATENCY_BUCKETS]
#: The HTTP servers' start tasks (kept alive here) and where they listen.
_servers: list[tuple[asyncio.Task[Any], Address]] = []


class NodeCollector:
    """One scrape = one consistent look at the node's counters (it runs on the node's loop)."""

    def __init__(self, runtime: NodeRuntime | Any, node_name: str) -> None:
        self.runtime = runtime
        self.node_name = node_name

    def collect(self) -> Iterator[Metric]:
        rt = self.runtime
        base = [self.node_name, rt.backend.kind, rt.options.export_name]
        op_labels = [*_LABELS, "op"]
        requests = CounterMetricFamily(
            "nbdfabric_requests", "NBD requests completed, by operation", labels=op_labels
        )
        nbytes = CounterMetricFamily(
            "nbdfabric_request_bytes", "Bytes read, written, zeroed or trimmed", labels=op_labels
        )
        errors = CounterMetricFamily(
            "nbdfabric_request_errors", "NBD requests answered with an error", labels=op_labels
        )
        latency = HistogramMetricFamily(
            "nbdfabric_request_duration_seconds",
            "Time from request received to reply ready",
            labels=op_labels,
        )
        for name, op in rt.stats.ops.items():
            labels = [*base, name]
            requests.add_metric(labels, op.count)
            nbytes.add_metric(labels, op.bytes)
            errors.add_metric(labels, op.errors)
            buckets, total = [], 0
            for bound, count in zip([*_BOUNDS, "+Inf"], op.buckets, strict=True):
                total += count
                buckets.append((bound, float(total)))
            latency.add_metric(labels, buckets, sum_value=op.latency_sum)
        yield from (requests, nbytes, errors, latency)

        s = rt.stats
        yield _family(CounterMetricFamily, "nbdfabric_connections", "NBD connections accepted",
                      base, s.connections_total)  # fmt: skip
        yield _family(GaugeMetricFamily, "nbdfabric_connections_open", "NBD connections open",
                      base, max(s.connections_open, 0))  # fmt: skip
        yield _family(GaugeMetricFamily, "nbdfabric_requests_in_flight",
                      "Requests received and not yet answered (held ones too)", base,
                      max(s.in_flight, 0))  # fmt: skip
        yield _family(CounterMetricFamily, "nbdfabric_protocol_errors",
                      "Malformed requests or handshakes", base, s.protocol_errors)  # fmt: skip
        yield _family(GaugeMetricFamily, "nbdfabric_export_size_bytes", "Export size",
                      base, rt.caps.size)  # fmt: skip
        yield _family(GaugeMetricFamily, "nbdfabric_start_time_seconds",
                      "Start time of the node (Unix time)", base, s.started)  # fmt: skip
        try:
            healthy = rt.healthy()
        except Exception:
            healthy = False
        yield _family(GaugeMetricFamily, "nbdfabric_up", "1 when the node can serve",
                      base, 1.0 if healthy else 0.0)  # fmt: skip
        state = GaugeMetricFamily(
            "nbdfabric_state", "1 for the state the node is in", labels=[*_LABELS, "state"]
        )
        for name in STATES:
            state.add_metric([*base, name], 1.0 if rt.state == name else 0.0)
        yield state


def _family(cls: Any, name: str, doc: str, labels: list[str], value: float) -> Metric:
    family = cls(name, doc, labels=_LABELS)
    family.add_metric(labels, value)
    return family  # type: ignore[no-any-return]


def registry_for(runtime: NodeRuntime | Any, node_name: str) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(runtime, node_name))  # type: ignore[arg-type]
    with contextlib.suppress(Exception):  # process_* metrics need /proc (Linux)
        ProcessCollector(registry=registry)
    return registry


async def _respond(
    registry: CollectorRegistry,
    runtime: NodeRuntime | Any,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    refresh: Callable[[], Awaitable[None]] | None = None,
) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
        writer.close()
        return
    if refresh is not None:
        await refresh()
    words = head.split(b"\r\n", 1)[0].decode("latin-1").split()
    method = words[0] if words else ""
    path = urlsplit(words[1]).path if len(words) > 1 else "/"
    ctype = "text/plain; charset=utf-8"
    if method not in ("GET", "HEAD"):
        status, body = "405 Method Not Allowed", b"only GET and HEAD\n"
    elif path in ("/metrics", "/"):
        status, body, ctype = "200 OK", generate_latest(registry), CONTENT_TYPE_LATEST
    elif path == "/healthz":
        ok = runtime.healthy()
        status, body = ("200 OK", b"ok\n") if ok else ("503 Service Unavailable", b"no\n")
    else:
        status, body = "404 Not Found", b"metrics are at /metrics\n"
    header = (
        f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")
    try:
        writer.write(header if method == "HEAD" else header + body)
        await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


def start_metrics(
    runtime: NodeRuntime | Any,
    addr: str,
    node_name: str,
    refresh: Callable[[], Awaitable[None]] | None = None,
) -> str:
    """Serve Prometheus metrics on `addr` (port 0: any free port) from the running loop;
    returns the bound address (`HOST:PORT` or `unix:PATH`). `runtime` is the node, or a view
    that `refresh` brings up to date before each request."""
    address = parse_address(addr, default_port=0)
    try:
        sock = open_listener(address)
    except AddressError as exc:  # say which of the node's addresses it is
        raise AddressError(f"--metrics: {exc}") from None
    registry = registry_for(runtime, node_name)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _respond(registry, runtime, reader, writer, refresh)

    if sock.family == socket.AF_UNIX:
        starting = asyncio.start_unix_server(handle, sock=sock)
    else:
        starting = asyncio.start_server(handle, sock=sock)
    task = asyncio.get_running_loop().create_task(starting)
    _servers.append((task, bound_address(sock)))
    bound = str(bound_address(sock))
    log.info("metrics on %s", bound)
    return bound


def stop_metrics() -> None:
    """Close this process's metrics listeners; a unix socket's file goes with it."""
    for task, address in _servers:
        if task.done() and not task.cancelled() and task.exception() is None:
            task.result().close()
        else:
            task.cancel()
        remove_socket_file(address)
    _servers.clear()
