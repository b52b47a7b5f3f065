"""A chain whose hop is TLS: our `nbd` filter reaching a `--tls=require` memory node over
nbds+unix with `--upstream-tls-certificates`, and refusing to start without the CA.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import make_certificates, run


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("chain-tls") / "pki"
    directory.mkdir()
    make_certificates(directory)
    return directory


@pytest.mark.parametrize("poll", ["0", "200"], ids=["plain", "polling"])
def test_chain_tls_upstream_carries_data(
    start_node: Any, pki: Path, tmp_path: Path, poll: str
) -> None:
    """Also with both nodes polling before they sleep (the TLS reader and a TLS upstream)."""
    polling = ("--poll-max-us", poll)
    tls = ("--tls=require", "--tls-certificates", str(pki))
    disk = start_node("memory", "8M", extra=(*tls, *polling))
    assert disk.uri.startswith("nbds+unix://")
    proxy = start_node(
        "nbd", upstreams=[disk.uri], extra=("--upstream-tls-certificates", str(pki), *polling)
    )
    src = tmp_path / "src.img"
    src.write_bytes(bytes(range(256)) * (8 * 4096))
    run(["nbdcopy", str(src), proxy.uri])
    back = tmp_path / "back.img"
    run(["nbdcopy", proxy.uri, str(back)])
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    # The bytes really are on the TLS-only node (read it directly over TLS).
    direct = tmp_path / "direct.img"
    run(["nbdcopy", f"{disk.uri}&tls-certificates={pki}", str(direct)])
    assert direct.read_bytes() == src.read_bytes()


def test_chain_tls_upstream_checks_the_certificate(
    start_node: Any, pki: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Over TCP libnbd verifies the server: a proxy that trusts another CA must not start.
    (Over unix sockets libnbd 1.14 checks no hostname, so the TCP case is the one to test.)"""
    other = tmp_path_factory.mktemp("other-ca") / "pki"
    other.mkdir()
    make_certificates(other)
    disk = start_node(
        "memory", "8M", listen="127.0.0.1:0",
        extra=("--tls=require", "--tls-certificates", str(pki)),
    )  # fmt: skip
    assert disk.uri.startswith("nbds://127.0.0.1:")
    proxy = start_node(
        "nbd",
        upstreams=[disk.uri],
        extra=("--upstream-tls-certificates", str(other), "--upstream-timeout", "2"),
        wait=False,
    )
    try:
        code = proxy.proc.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail("the proxy kept running with an upstream it cannot verify")
    assert code == 1
    assert "certificate" in proxy.stderr().lower()
    good = start_node("nbd", upstreams=[disk.uri], extra=("--upstream-tls-certificates", str(pki)))
    run(["qemu-io", "-f", "raw", good.uri, "-c", "write -P 0x3c 0 64k", "-c", "read -P 0x3c 0 64k"])


def test_chain_tls_both_ways_client_certificates(
    start_node: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Mutual TLS between nodes: a node that verifies its peers (--tls-verify-peer) serves a
    proxy whose --upstream-tls-certificates directory holds a client certificate of its CA,
    and refuses one without, which exits naming the TLS alert it was sent."""
    pki = tmp_path_factory.mktemp("mutual") / "pki"
    make_certificates(pki, client=True)
    bare = pki.parent / "bare"
    bare.mkdir()
    shutil.copy(pki / "ca-cert.pem", bare)
    disk = start_node(
        "memory", "8M", listen="127.0.0.1:0",
        extra=("--tls=require", "--tls-certificates", str(pki), "--tls-verify-peer"),
    )  # fmt: skip
    proxy = start_node("nbd", upstreams=[disk.uri], extra=("--upstream-tls-certificates", str(pki)))
    run(
        ["qemu-io", "-f", "raw", proxy.uri, "-c", "write -P 0x7e 0 64k", "-c", "read -P 0x7e 0 64k"]
    )
    refused = start_node(
        "nbd",
        upstreams=[disk.uri],
        extra=("--upstream-tls-certificates", str(bare), "--upstream-timeout", "1"),
        wait=False,
    )
    try:
        code = refused.proc.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail("a proxy without a client certificate was let in")
    assert code == 1
    assert "alert" in refused.stderr().lower(), refused.stderr()
