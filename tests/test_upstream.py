"""nodes/upstream.py: the libnbd "next", exercised through real node processes and in-process.

Capabilities and flags pass through, upstream holes stay holes, errnos survive the hop, a lost
upstream fails requests with EIO and comes back by itself, and the proxy does not leak memory.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import subprocess

import nbd
import pytest
from conftest import NBDFABRIC, capabilities, nbd_connect, rss_kib, run, wait_for

from nodes.upstream import Upstream

MiB = 1 << 20


def test_upstream_proxy_same_capabilities(start_node):
    mem = start_node("memory", "16M")
    proxy = start_node("nbd", upstreams=[mem.uri])
    assert capabilities(proxy.uri) == capabilities(mem.uri)
    ro = start_node("memory", "16M", extra=("--read-only",))
    proxy_ro = start_node("nbd", upstreams=[ro.uri])
    got = capabilities(proxy_ro.uri)
    assert got["is_read_only"] is True
    assert got == capabilities(ro.uri)


def test_upstream_sparse_read_stays_sparse(start_node):
    mem = start_node("memory", "8M")
    proxy = start_node("nbd", upstreams=[mem.uri])
    run(["qemu-io", "-f", "raw", "-t", "writeback", proxy.uri, "-c", "write -P 0x5a 2M 64k"])
    h = nbd_connect(proxy.uri)
    chunks: list[tuple[int, int, int]] = []

    def chunk(sub, off, status, err):
        chunks.append((off, len(sub), status))
        return 0

    buf = h.pread_structured(4 * 1024 * 1024, 0, chunk)
    assert buf[2 * 1024 * 1024 : 2 * 1024 * 1024 + 65536] == b"\x5a" * 65536
    holes = sorted((o, n) for o, n, s in chunks if s == nbd.READ_HOLE)
    data = sorted((o, n) for o, n, s in chunks if s == nbd.READ_DATA)
    assert holes and sum(n for _, n in holes) == 4 * 1024 * 1024 - 65536
    assert data == [(2 * 1024 * 1024, 65536)]


def test_upstream_flags_pass_through(start_node, start_nbdkit, tmp_path):
    """FUA, NO_HOLE and FAST_ZERO reach the upstream (nbdkit's log filter shows them)."""
    log = tmp_path / "log.txt"
    up = start_nbdkit("--filter=log", "memory", "size=8M", f"logfile={log}")
    proxy = start_node("nbd", upstreams=[up.uri])
    h = nbd_connect(proxy.uri)
    h.pwrite(b"x" * 4096, 0, nbd.CMD_FLAG_FUA)
    h.zero(4096, 8192, nbd.CMD_FLAG_NO_HOLE)
    h.zero(4096, 16384, nbd.CMD_FLAG_FAST_ZERO)
    h.trim(4096, 32768, nbd.CMD_FLAG_FUA)
    h.shutdown()
    proxy.stop()  # nbdkit waits for its clients on SIGTERM: close ours first
    text = wait_for(lambda: log.read_text() if "Trim" in log.read_text() else "", 10, "log")
    assert "Write id=" in text and "fua=1" in text
    assert any("Zero" in ln and "trim=0" in ln for ln in text.splitlines())
    assert any("Zero" in ln and "fast=1" in ln for ln in text.splitlines())


def test_upstream_fua_on_a_read_is_accepted(start_node):
    """FUA is allowed on any command once advertised (spec); on a read it means nothing, and
    libnbd refuses it on pread, so a filter must not pass it on (it answered EINVAL)."""
    mem = start_node("memory", "1M")
    proxy = start_node("nbd", upstreams=[mem.uri])
    h = nbd_connect(proxy.uri, strict=False)
    assert h.can_fua()
    h.pwrite(b"r" * 4096, 0)
    assert h.pread(4096, 0, nbd.CMD_FLAG_FUA) == b"r" * 4096
    h.cache(4096, 0, nbd.CMD_FLAG_FUA)
    h.block_status(4096, 0, lambda *args: 1, nbd.CMD_FLAG_FUA)
    h.shutdown()


def test_upstream_errno_preserved(start_node, start_nbdkit):
    # The upstream's own errno (ENOSPC from nbdkit's error filter) comes through unchanged.
    up = start_nbdkit(
        "--filter=error", "memory", "size=8M", "error=ENOSPC", "error-pwrite-rate=100%"
    )
    proxy = start_node("nbd", upstreams=[up.uri])
    h = nbd_connect(proxy.uri)
    with pytest.raises(nbd.Error) as exc:
        h.pwrite(b"a" * 512, 0)
    assert exc.value.errnum == errno.ENOSPC
    h.shutdown()
    proxy.stop()
    # Past the end through a proxy: ENOSPC; on a read-only upstream: EPERM.
    mem = start_node("memory", "1M")
    proxy2 = start_node("nbd", upstreams=[mem.uri])
    h2 = nbd_connect(proxy2.uri, strict=False)
    with pytest.raises(nbd.Error) as exc:
        h2.pwrite(b"a" * 4096, 1024 * 1024 - 1024)
    assert exc.value.errnum == errno.ENOSPC
    ro = start_node("memory", "1M", extra=("--read-only",))
    h3 = nbd_connect(start_node("nbd", upstreams=[ro.uri]).uri, strict=False)
    with pytest.raises(nbd.Error) as exc:
        h3.pwrite(b"a" * 512, 0)
    assert exc.value.errnum == errno.EPERM
    h4 = nbd_connect(start_node("cow", upstreams=[ro.uri]).uri)
    h4.pwrite(b"a" * 512, 0)  # the overlay is writable over the read-only upstream


@pytest.mark.parametrize(
    "relay, poll",
    [("true", "0"), ("true", "200"), ("false", "200")],
    ids=["relay", "relay-polling", "pool-polling"],
)
def test_upstream_loss_fails_with_eio_then_recovers(start_node, tmp_path, relay, poll):
    """The relaying proxy (the default), and polling its sockets (the relay's upstream socket
    leaves and rejoins the poll), and one that re-issues through libnbd's pool, polling (the
    pool's fds leave and rejoin it): all EIO, then serve again."""
    sock = str(tmp_path / "up.sock")
    mem = start_node("memory", "8M", listen=f"unix:{sock}")
    proxy = start_node("nbd", f"relay={relay}", upstreams=[mem.uri], control=True,
                       extra=("--poll-max-us", poll), env={"NBDFABRIC_LOG": "info"})  # fmt: skip
    h = nbd_connect(proxy.uri)
    h.pwrite(b"q" * 4096, 0)
    mem.kill()
    os.unlink(sock) if os.path.exists(sock) else None
    with pytest.raises(nbd.Error) as exc:
        h.pread(4096, 0)
    assert exc.value.errnum == errno.EIO
    with pytest.raises(nbd.Error) as exc:  # while down: fails fast, same errno
        h.pwrite(b"r" * 4096, 0)
    assert exc.value.errnum == errno.EIO
    start_node("memory", "8M", listen=f"unix:{sock}")

    def serves() -> bool:
        try:
            return h.pread(4096, 0) == bytes(4096)  # a fresh memory node: zeros
        except nbd.Error:
            return False

    wait_for(serves, 20, "the proxy to reconnect")
    h.pwrite(b"s" * 4096, 0)
    assert h.pread(4096, 0) == b"s" * 4096
    relayed = "relayed to" in proxy.stderr()
    assert relayed == (relay == "true") and (not relayed or "is back" in proxy.stderr())
    if poll != "0":
        # Watched: the client's socket, the pool's connections and a relay's own; none of
        # the connections the outage closed.
        assert proxy.control is not None
        got = json.loads(run([*NBDFABRIC, "ctl", "--json", proxy.control, "info"]).stdout)
        pool = got["upstreams"][0]["detail"]["connections"]
        assert got["polling"]["sockets"] == 1 + pool + relayed, got["polling"]


def test_upstream_that_comes_back_with_less_is_not_taken_back(start_node, tmp_path):
    """An upstream restarted smaller, or read-only, is not used (its clients were promised
    8M and writes): requests fail with EIO and the status says why; once it offers what it
    did, the proxy takes it back. (A bigger one is fine: nothing promised is missing.)"""
    sock = str(tmp_path / "up.sock")
    mem = start_node("memory", "8M", listen=f"unix:{sock}")
    proxy = start_node("nbd", upstreams=[mem.uri], control=True)
    h = nbd_connect(proxy.uri)
    h.pwrite(b"q" * 4096, 8 * MiB - 4096)

    def status() -> dict:
        out = run([*NBDFABRIC, "ctl", "--json", proxy.control, "info"]).stdout
        up = json.loads(out)["upstreams"][0]
        return {"state": up["state"], "last_error": json.dumps(up)}

    for args, why in [
        (("4M",), "4194304 bytes, was 8388608"),
        (("8M", "--read-only"), "no writable"),
    ]:
        mem.kill()
        os.unlink(sock) if os.path.exists(sock) else None
        mem = start_node("memory", *args, listen=f"unix:{sock}")
        wait_for(lambda why=why: why in status()["last_error"], 20, f"the proxy to refuse: {why}")
        assert status()["state"] != "up"
        with pytest.raises(nbd.Error) as exc:
            h.pread(4096, 0)
        assert exc.value.errnum == errno.EIO
    mem.kill()
    os.unlink(sock) if os.path.exists(sock) else None
    start_node("memory", "16M", listen=f"unix:{sock}")

    def serves() -> bool:
        try:
            return h.pread(4096, 8 * MiB - 4096) == bytes(4096)  # a fresh memory node
        except nbd.Error:
            return False

    wait_for(serves, 20, "the proxy to take the bigger upstream back")
    h.pwrite(b"s" * 4096, 0)
    assert h.pread(4096, 0) == b"s" * 4096 and h.get_size() == 8 * MiB
    h.shutdown()


def test_upstream_status_and_backoff_in_process(start_node, tmp_path):
    sock = str(tmp_path / "u.sock")
    mem = start_node("memory", "4M", listen=f"unix:{sock}")
    uri = f"nbd+unix:///?socket={sock}"

    async def scenario() -> None:
        up = Upstream(uri, name="t", connect_timeout=5)
        await up.start()
        st = up.status()["upstreams"][0]
        assert st["state"] == "up" and st["uri"] == uri and up.healthy()
        assert st["connections"] == 4  # memory advertises multi-conn: a pool
        buf = bytearray(8192)
        view = memoryview(buf)
        view[:] = b"z" * 8192
        await up.pwrite(view, 4096, 0)
        back = bytearray(8192)
        assert await up.pread(memoryview(back), 4096, 0) in (None, [])
        assert back == buf
        holes = await up.pread(memoryview(bytearray(65536)), 65536, 0)
        assert holes == [(0, 65536)]
        assert await up.extents(1 << 20, 0, 0) == [(32768, 0), ((1 << 20) - 32768, 3)]
        # Many requests in flight across the pool at once.
        results = await asyncio.gather(
            *(up.pread(memoryview(bytearray(4096)), i * 4096, 0) for i in range(300))
        )
        assert len(results) == 300
        mem.kill()
        with pytest.raises(OSError) as exc:
            await up.pread(memoryview(bytearray(4096)), 0, 0)
        assert exc.value.errno == errno.EIO
        assert not up.healthy()
        assert up.status()["upstreams"][0]["state"] in ("down", "connecting")
        with pytest.raises(OSError) as exc:
            await up.flush(0)
        assert exc.value.errno == errno.EIO
        await asyncio.to_thread(start_node, "memory", "4M", listen=f"unix:{sock}")
        for _ in range(400):
            if up.healthy():
                break
            await asyncio.sleep(0.05)
        assert up.healthy() and up.status()["upstreams"][0]["reconnects"] == 1
        await up.pwrite(view, 0, 0)
        await up.stop()

    asyncio.run(scenario())


def test_upstream_start_times_out_naming_the_uri(tmp_path):
    uri = f"nbd+unix:///?socket={tmp_path}/nothing.sock"

    async def scenario() -> None:
        up = Upstream(uri, connect_timeout=0.3)
        with pytest.raises(OSError) as exc:
            await up.start()
        assert uri in str(exc.value)

    asyncio.run(scenario())


def test_upstream_node_exits_when_upstream_never_comes(start_node, tmp_path):
    with pytest.raises(RuntimeError, match=r"nothing\.sock"):
        start_node(
            "nbd",
            upstreams=[f"nbd+unix:///?socket={tmp_path}/nothing.sock"],
            extra=("--upstream-timeout", "0.5"),
        )


def test_upstream_over_tcp_and_mixed_with_nbdkit(start_node, start_nbdkit, tmp_path):
    # Our proxy on TCP over nbdkit memory; then nbdkit's nbd plugin over our proxy.
    kit = start_nbdkit("memory", "size=16M")
    tcp = start_node("nbd", upstreams=[kit.uri], listen="127.0.0.1:0")
    assert tcp.uri.startswith("nbd://127.0.0.1:")
    outer_sock = tmp_path / "outer.sock"
    outer = subprocess.Popen(
        ["nbdkit", "-f", "-U", str(outer_sock), "nbd", f"uri={tcp.uri}"],
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(outer_sock.exists, 20, "nbdkit nbd")
        outer_uri = f"nbd+unix:///?socket={outer_sock}"
        run(["qemu-io", "-f", "raw", "-t", "writeback", outer_uri, "-c", "write -P 0x77 1M 3M"])
        run(["qemu-io", "-f", "raw", kit.uri, "-c", "read -P 0x77 1M 3M", "-c", "read -P 0 0 1M"])
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", kit.uri, outer_uri])
    finally:
        outer.terminate()
        outer.wait()
        tcp.stop()


def test_upstream_nbdcopy_checksums(start_node, tmp_path):
    data = os.urandom(6 * 1024 * 1024)
    src = tmp_path / "src.img"
    src.write_bytes(data)
    mem = start_node("memory", "6M")
    proxy = start_node("nbd", upstreams=[mem.uri])
    run(["nbdcopy", str(src), proxy.uri])
    out = tmp_path / "out.img"
    run(["nbdcopy", mem.uri, str(out)])
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_upstream_proxy_does_not_leak(start_node, start_nbdkit):
    """~2 GiB of writes and reads through a proxy: its RSS stops growing after warm-up."""
    size = "256M"
    src = start_nbdkit("pattern", f"size={size}")
    mem = start_node("memory", size)
    proxy = start_node("nbd", upstreams=[mem.uri])
    copy = ["nbdcopy", "--no-extents", "-S", "0", "--request-size=262144"]

    def round_trip() -> None:  # 256 MiB in, 256 MiB out
        run([*copy, src.uri, proxy.uri], timeout=300)
        run([*copy, proxy.uri, "null:"], timeout=300)

    round_trip()
    early = rss_kib(proxy.pid)
    for _ in range(3):
        round_trip()
    late = rss_kib(proxy.pid)
    print(f"proxy RSS after 0.5 GiB: {early} KiB, after 2 GiB: {late} KiB")
    assert late - early < 16 * 1024, f"RSS grew from {early} to {late} KiB"
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src.uri, proxy.uri])
    proxy.stop()


def test_upstream_cancel_keeps_buffer_lent_until_done_and_queue_beyond_limit(start_nbdkit):
    """A cancelled read returns only once libnbd is done with its buffer (it could be reused
    at once), and more requests than one handle takes in flight queue up and all complete with
    the right data."""
    from nodes import upstream as upstream_mod

    slow = start_nbdkit("--filter=delay", "memory", "4M", "rdelay=300ms")
    fast = start_nbdkit("memory", "4M")

    async def scenario() -> None:
        up = Upstream(slow.uri, connect_timeout=5)
        await up.start()
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(up.pread(memoryview(bytearray(4096)), 0, 0))
        await asyncio.sleep(0.05)
        started = loop.time()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert loop.time() - started > 0.15, "returned while libnbd still held the buffer"
        await up.pread(memoryview(bytearray(4096)), 0, 0)  # the handle is still in step
        await up.stop()

        up = Upstream(fast.uri, connect_timeout=5, pool_size=1)
        await up.start()
        n = upstream_mod.MAX_IN_FLIGHT * 3
        blocks = [os.urandom(4096) for _ in range(n)]
        await asyncio.gather(*(up.pwrite(memoryview(b), i * 4096, 0) for i, b in enumerate(blocks)))
        bufs = [bytearray(4096) for _ in range(n)]
        await asyncio.gather(*(up.pread(memoryview(b), i * 4096, 0) for i, b in enumerate(bufs)))
        assert bufs == blocks
        await up.stop()

    asyncio.run(scenario())


def test_upstream_block_status_bursts_take_few_places_on_the_shared_handles(start_nbdkit):
    """The handles are shared by every client of the node: a burst of BLOCK_STATUS (each may
    cost the upstream milliseconds) waits in the node, a few in flight per handle, so the
    other clients' requests do not queue behind all of it upstream."""
    from nodes import upstream as upstream_mod

    slow = start_nbdkit("--filter=delay", "memory", "4M", "delay-extents=200ms")

    async def scenario() -> None:
        up = Upstream(slow.uri, connect_timeout=5)
        await up.start()
        handles = up.status()["upstreams"][0]["connections"]
        assert handles == 4  # nbdkit memory advertises multi-conn: a pool
        burst = [asyncio.ensure_future(up.extents(1 << 20, i % 4 << 20, 0)) for i in range(20)]
        await asyncio.sleep(0.05)
        in_flight = up.status()["upstreams"][0]["in_flight"]
        assert in_flight == handles * upstream_mod.STATUS_IN_FLIGHT < len(burst)
        back = bytearray(4096)
        assert await up.pread(memoryview(back), 0, 0) in (None, [])  # not behind the burst
        assert not all(t.done() for t in burst)
        for extents in await asyncio.gather(*burst):
            assert extents == [(1 << 20, 3)]
        await up.stop()

    asyncio.run(scenario())


def test_upstream_splits_reads_and_writes_beyond_the_upstream_maximum(tmp_path):
    """A read or write larger than the upstream's maximum block size (qemu-nbd: 32 MiB) goes as
    several requests in flight; the holes of each part come back at their place in the whole
    buffer, merged across the seams."""
    image, sock = tmp_path / "sparse.img", tmp_path / "qemu.sock"
    with image.open("wb") as f:
        f.truncate(64 << 20)
    data = os.urandom(4096)
    with image.open("r+b") as f:
        f.write(data)
        f.seek(35 << 20)
        f.write(data)
    qemu = subprocess.Popen(["qemu-nbd", "-t", "-f", "raw", "-k", str(sock), str(image)])
    try:
        wait_for(sock.exists, 20, "qemu-nbd socket")

        async def scenario() -> None:
            up = Upstream(f"nbd+unix:///?socket={sock}", connect_timeout=5)
            await up.start()
            assert up._max_request == 32 << 20
            buf = bytearray(b"\xff" * (40 << 20))
            holes = await up.pread(memoryview(buf), 0, 0)
            assert holes == [(4096, (35 << 20) - 4096), ((35 << 20) + 4096, (5 << 20) - 4096)]
            assert buf[:4096] == data and buf[35 << 20 : (35 << 20) + 4096] == data
            # One write of 34 MiB lands whole, in two parts.
            big = os.urandom(34 << 20)
            await up.pwrite(memoryview(big), 1 << 20, 0)
            back = bytearray(34 << 20)
            assert await up.pread(memoryview(back), 1 << 20, 0) == []
            assert back == big
            await up.stop()

        asyncio.run(scenario())
    finally:
        qemu.terminate()
        qemu.wait(10)


def test_upstream_works_through_the_public_libnbd_methods(start_node, monkeypatch):
    """The per-request libnbd calls are bound to the C extension where we checked that is the
    same thing (libnbd 1.14); without it they go through nbd.NBD's public methods, and work."""
    import functools

    mem = start_node("memory", "4M")
    block = os.urandom(8192)

    async def scenario() -> bool:
        up = Upstream(mem.uri, connect_timeout=5, pool_size=1)
        await up.start()
        bound = isinstance(up._conns[0].calls.peek, functools.partial)
        await up.pwrite(memoryview(block), 32768, 0)  # in the memory node's second 32K page
        back = bytearray(98304)
        holes = await up.pread(memoryview(back), 0, 0)
        assert holes == [(0, 32768), (65536, 32768)]
        assert back[32768:40960] == block
        await up.stop()
        return bound

    assert asyncio.run(scenario()) == nbd.NBD().get_version().startswith("1.14.")
    monkeypatch.setattr("nodes.upstream._LIBNBDMOD", None)
    assert asyncio.run(scenario()) is False
