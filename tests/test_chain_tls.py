"""A chain whose hop is TLS: our `nbd` filter reaching a `--tls=require` memory node over
nbds+unix with `--upstream-tls-certificates`, and refusing to start without the CA; and the
`tls-fallback` filter, which serves plaintext clients a notice instead of the disk.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import errno_of, export_info, make_certificates, nbd_connect, read_all, run, wait_for

from nodes.filters.tls_fallback import DEFAULT_README


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


# tls-fallback --------------------------------------------------------------------------------


def _secure(uri: str, pki: Path) -> str:
    """The TLS form of a node's plain `nbd+unix://` URI, trusting `pki`'s CA."""
    return uri.replace("nbd+unix://", "nbds+unix://", 1) + f"&tls-certificates={pki}"


@pytest.mark.parametrize("peer", ["ours", "nbdkit"])
def test_tls_fallback_serves_plaintext_clients_a_notice(
    start_node: Any, start_nbdkit: Any, pki: Path, tmp_path: Path, peer: str
) -> None:
    """nbdkit-tls-fallback-filter's contract, checked on nbdkit 1.32 and on our node with the
    same clients: a plaintext client gets a 512-byte read-only notice whatever export it names,
    and never reaches the disk; a TLS client gets the disk, read and write."""
    tls = ("--tls=on", f"--tls-certificates={pki}")
    if peer == "ours":
        disk = start_node("memory", "1M")
        node = start_node("tls-fallback", upstreams=[disk.uri], extra=tls)
        uri = node.uri
    else:
        uri = start_nbdkit(*tls, "--filter=tls-fallback", "memory", "1M").uri
    assert uri.startswith("nbd+unix://")
    named = uri.replace(":///", ":///some-export", 1)
    plain = export_info(named)
    assert plain["export-size"] == 512 and plain["is_read_only"] is True
    assert {k: plain[k] for k in ("can_flush", "can_trim", "can_zero", "can_multi_conn")} == {
        "can_flush": False, "can_trim": False, "can_zero": False, "can_multi_conn": False
    }  # fmt: skip
    h = nbd_connect(named)
    notice = bytes(h.pread(512, 0))
    assert notice == DEFAULT_README.encode().ljust(512, b"\0")
    assert errno_of(h.pwrite, b"x", 0) == "EPERM"
    assert errno_of(h.pread, 1, 512) == "EINVAL"
    h.shutdown()
    # qemu, plaintext: the same notice, and its writes refused.
    out = run(["qemu-io", "-r", "-f", "raw", uri, "-c", "read -v 0 16"]).stdout
    assert "This.NBD.server." in out  # the hex dump's text column
    assert run(["qemu-io", "-f", "raw", uri, "-c", "write 0 512"], check=False).returncode != 0
    # Over TLS: the disk itself, with its data.
    secure = _secure(uri, pki)
    assert export_info(secure)["export-size"] == 1024 * 1024
    src = tmp_path / "src.img"
    src.write_bytes(bytes(range(256)) * 4096)
    run(["nbdcopy", str(src), secure])
    back = tmp_path / "back.img"
    run(["nbdcopy", secure, str(back)])
    assert back.read_bytes() == src.read_bytes()
    # A plaintext client still reads the notice, not what was just written.
    assert read_all(uri, 512) == notice
    if peer == "ours":
        assert read_all(disk.uri) == src.read_bytes()  # the bytes are on the disk node


def test_tls_fallback_message_and_what_plaintext_clients_cost(
    start_node: Any, pki: Path, tmp_path: Path
) -> None:
    """tlsreadme= is padded with NULs to a multiple of 512 bytes (nbdkit 1.32 cuts a longer one
    at 512; we serve it whole), and no request of a plaintext client reaches the upstream: a
    `log` node under the fallback logs the TLS client's reads only."""
    disk = start_node("memory", "1M")
    logfile = tmp_path / "upstream.log"
    logged = start_node("log", f"logfile={logfile}", upstreams=[disk.uri])
    message = "\u00e9" * 300  # 600 bytes of UTF-8
    node = start_node(
        "tls-fallback", f"tlsreadme={message}", upstreams=[logged.uri],
        extra=("--tls=on", f"--tls-certificates={pki}"),
    )  # fmt: skip

    def reads() -> int:
        return logfile.read_text().count('"op":"read"')

    assert export_info(node.uri)["export-size"] == 1024
    assert read_all(node.uri) == message.encode().ljust(1024, b"\0")
    assert reads() == 0, "a plaintext client's read reached the disk"
    run(["nbdcopy", "--no-extents", _secure(node.uri, pki), str(tmp_path / "disk.img")])
    wait_for(lambda: reads() > 0, 10, "the TLS client's read in the upstream's log")
