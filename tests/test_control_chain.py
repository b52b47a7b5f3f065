"""The control plane over a real process chain: a filter node's health follows its upstream,
and a live param change made over gRPC is seen in the data path of the running chain.
"""

from __future__ import annotations

import errno
import time

import grpc
import nbd
import pytest
from conftest import nbd_connect, wait_for
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nodes.control.rpc.nbdfabric.v1 import node_pb2 as pb
from nodes.control.rpc.nbdfabric.v1 import node_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _status(health: health_pb2_grpc.HealthStub) -> int:
    return int(health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status)


def test_control_chain_health_follows_the_upstream(start_node, tmp_path):
    sock = str(tmp_path / "upstream.sock")
    disk = start_node("memory", "4M", listen=f"unix:{sock}")
    proxy = start_node("nbd", upstreams=[disk.uri], control=True)
    with grpc.insecure_channel(proxy.control) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        assert _status(health) == SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(watch).status == SERVING

        disk.kill()
        # The proxy only learns of the loss when it uses the link: a read fails with EIO.
        h = nbd_connect(proxy.uri)
        with pytest.raises(nbd.Error) as exc:
            h.pread(4096, 0)
        assert exc.value.errnum == errno.EIO
        assert next(watch).status == NOT_SERVING
        assert _status(health) == NOT_SERVING

        start_node("memory", "4M", listen=f"unix:{sock}")  # back on the same socket
        assert next(watch).status == SERVING
        wait_for(lambda: _status(health) == SERVING, 30, "the proxy to serve again")
        h2 = nbd_connect(proxy.uri)
        assert h2.pread(4096, 0) == bytes(4096)
        h2.shutdown()


def test_control_chain_live_error_rate_reaches_the_data_path(start_node):
    disk = start_node("memory", "4M")
    faulty = start_node(
        "error", "error-rate=0%", "error=ENOSPC", upstreams=[disk.uri], control=True
    )
    h = nbd_connect(faulty.uri)
    h.pwrite(b"\x5a" * 4096, 0)
    assert h.pread(4096, 0) == b"\x5a" * 4096
    with grpc.insecure_channel(faulty.control) as ch:
        stub = pb_grpc.NodeServiceStub(ch)
        stub.Configure(pb.ConfigureRequest(changes={"error-rate": "100%"}), timeout=5)
        with pytest.raises(nbd.Error) as exc:
            h.pread(4096, 0)
        assert exc.value.errnum == errno.ENOSPC
        stub.Configure(pb.ConfigureRequest(changes={"error-rate": "0%"}), timeout=5)
        assert h.pread(4096, 0) == b"\x5a" * 4096
        # A raised delay on a second hop: the next read takes at least that long.
        slow = start_node("delay", upstreams=[faulty.uri], control=True)
        with grpc.insecure_channel(slow.control) as ch2:
            pb_grpc.NodeServiceStub(ch2).Configure(
                pb.ConfigureRequest(changes={"delay-read": "300ms"}), timeout=5
            )
        h3 = nbd_connect(slow.uri)
        t0 = time.monotonic()
        assert h3.pread(4096, 0) == b"\x5a" * 4096
        assert time.monotonic() - t0 >= 0.29
        h3.shutdown()
    h.shutdown()
