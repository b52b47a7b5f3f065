"""nodes/server/relay.py: `nbd relay=true`, a hop that relays NBD messages instead of re-issuing
them, driven by real clients and compared with the normal hop and a direct connection.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import threading
import time

import nbd
import pytest
from conftest import nbd_connect, run, sha, wait_for
from test_filters_catalog import SECTOR, gpt_disk
from test_filters_pause import ControlSocket, completed

MiB = 1 << 20
#: The relay says so per connection at log level INFO (a connection that cannot relay is
#: served by the normal path, which gives the same answers: the tests check it relayed).
INFO = {"NBDFABRIC_LOG": "info"}


def relays(node, times: int = 1) -> bool:
    return node.stderr().count("relayed to") >= times


@pytest.fixture
def hops(start_node):
    """A memory node, the relay over it and the normal hop over it."""

    def make(size: str = "64M", normal: bool = False):
        up = start_node("memory", size)
        relay = start_node("nbd", "relay=true", upstreams=[up.uri], env=INFO)
        hop = start_node("nbd", "relay=false", upstreams=[up.uri]) if normal else None
        return up, relay, hop

    return make


def test_relay_qemu_io_every_command(hops):
    up, relay, _ = hops()
    cmds = [
        "write -P 0x41 0 1M",
        "write -P 0x42 -f 1M 64k",
        "write -z 2M 1M",
        "write -z -u 3M 64k",
        "discard 4M 1M",
        "flush",
        "read -P 0x41 0 1M",
        "read -P 0x42 1M 64k",
        "read -P 0 2M 1M",
        "read -P 0 4M 1M",
    ]
    args = [a for c in cmds for a in ("-c", c)]
    out = run(["qemu-io", "-f", "raw", *args, relay.uri]).stdout
    assert "Pattern verification failed" not in out, out
    assert out.count("read ") == 4 and out.count("wrote ") == 4, out
    h = nbd_connect(relay.uri)
    h.cache(MiB, 0)
    h.pwrite(b"x" * 4096, 0, nbd.CMD_FLAG_FUA)
    h.zero(65536, 8 * MiB, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    h.trim(65536, 8 * MiB, nbd.CMD_FLAG_FUA)
    got = h.pread_structured(4096, 0, lambda *a: 0, nbd.CMD_FLAG_DF)
    assert bytes(got) == b"x" * 4096
    assert relays(relay, 2)
    assert read_through(up.uri, 0, 2 * MiB) == read_through(relay.uri, 0, 2 * MiB)


def read_through(uri: str, offset: int, length: int) -> bytes:
    h = nbd_connect(uri)
    try:
        return bytes(h.pread(length, offset))
    finally:
        h.shutdown()


def test_relay_nbdcopy_both_ways_with_checksums(hops, tmp_path):
    up, relay, _ = hops("16M")
    data = random.Random(1).randbytes(16 * MiB)
    src = tmp_path / "in.img"
    src.write_bytes(data)
    run(["nbdcopy", str(src), relay.uri])
    out = subprocess.run(["nbdcopy", relay.uri, "-"], capture_output=True, check=True).stdout
    assert sha(out) == sha(data)
    direct = subprocess.run(["nbdcopy", up.uri, "-"], capture_output=True, check=True).stdout
    assert sha(direct) == sha(data)
    assert relays(relay, 2)


def test_relay_map_keeps_holes(hops):
    up, relay, hop = hops("16M", normal=True)
    h = nbd_connect(up.uri)
    h.pwrite(b"d" * MiB, 2 * MiB)
    h.pwrite(b"e" * 4096, 9 * MiB)
    maps = [run(["nbdinfo", "--map", u]).stdout for u in (up.uri, relay.uri, hop.uri)]
    assert maps[0] == maps[1] == maps[2], maps
    assert "hole" in maps[1] and "data" in maps[1]
    assert relays(relay)


def test_relay_over_nbdkit_memory_renumbers_the_context_id(start_nbdkit, start_node):
    # (start_nbdkit first: torn down last, as nbdkit waits for its clients, our nodes, to leave)
    """nbdkit numbers base:allocation 0, we number it 1: a block-status chunk relayed
    unchanged would carry an id the client never got (libnbd fails the command)."""
    kit = start_nbdkit("memory", "8M")
    relay = start_node("nbd", "relay=true", upstreams=[kit.uri], env=INFO)
    h = nbd_connect(relay.uri)
    h.pwrite(b"k" * 65536, MiB)
    seen: list[tuple[str, list[int]]] = []
    h.block_status(4 * MiB, 0, lambda ctx, off, ents, err: seen.append((ctx, ents)) or 0)
    assert seen and seen[0][0] == nbd.CONTEXT_BASE_ALLOCATION
    assert seen[0][1][:2] == [MiB, 3]  # a hole, then the data
    assert bytes(h.pread(65536, MiB)) == b"k" * 65536
    run(["nbdcopy", relay.uri, "null:"])
    assert relays(relay, 2)


def outcomes(uri: str, structured: bool = True) -> list[str | None]:
    """What a libnbd client with strict mode off gets for each edge case."""
    h = nbd_connect(uri, strict=False, structured=structured)
    size = h.get_size()
    cases = [
        lambda: h.pread(4096, size),  # past the end
        lambda: h.pread(8192, size - 4096),  # across the end
        lambda: h.pwrite(b"a" * 4096, size),  # write past the end: ENOSPC
        lambda: h.zero(4096, size - 2048),
        lambda: h.trim(4096, size),
        lambda: h.pread(0, 0),  # zero-length
        lambda: h.pwrite(b"", 0),
        lambda: h.block_status(0, 0, lambda *a: 0),  # zero-length block status: EINVAL
        lambda: h.pread(4096, 0, 1 << 9),  # an unknown flag
        lambda: h.pwrite(b"b" * 4096, 0, nbd.CMD_FLAG_DF),  # DF on a write
        lambda: h.pread(4096, 0, nbd.CMD_FLAG_FUA),  # FUA on a read: accepted
        lambda: h.pread(33 * MiB, 0),  # over the maximum
        lambda: h.pread(4097, 511),  # misaligned (refused where block_min > 1)
        lambda: h.pwrite(b"c" * 512, 513),
        lambda: h.cache(4096, size - 1024),
        lambda: h.flush(),
    ]
    got = []
    for case in cases:
        try:
            case()
            got.append(None)
        except nbd.Error as exc:
            got.append(errno.errorcode.get(exc.errnum or 0, str(exc.errnum)))
    h.shutdown()
    return got


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_relay_edge_cases_answer_as_the_normal_hop_and_direct(hops, structured):
    up, relay, hop = hops("16M", normal=True)
    direct = outcomes(up.uri, structured)
    assert outcomes(relay.uri, structured) == outcomes(hop.uri, structured) == direct
    assert "EINVAL" in direct and "ENOSPC" in direct
    assert relays(relay)


def test_relay_edge_cases_on_a_block_size_and_read_only(start_nbdkit, start_node):
    """The checks the node makes itself (alignment from a 512-byte minimum, --read-only)
    answer as the normal hop's; nbdkit with the same filters answers the same."""
    kit = start_nbdkit("--filter=blocksize-policy", "memory", "16M",
                       "blocksize-minimum=512", "blocksize-error-policy=error")  # fmt: skip
    relay = start_node("nbd", "relay=true", upstreams=[kit.uri], env=INFO)
    hop = start_node("nbd", "relay=false", upstreams=[kit.uri])
    got = outcomes(relay.uri)
    assert got == outcomes(hop.uri)
    assert got[12] == got[13] == "EINVAL"
    ro = start_node("nbd", "relay=true", upstreams=[kit.uri], env=INFO, extra=("--read-only",))
    ro_hop = start_node("nbd", "relay=false", upstreams=[kit.uri], extra=("--read-only",))
    got = outcomes(ro.uri)
    assert got == outcomes(ro_hop.uri)
    assert got[2] == got[6] == "EPERM"
    assert relays(relay) and relays(ro)


def test_relay_many_requests_in_flight_out_of_order(hops):
    """Random reads and writes of many sizes, 64 in flight, against a model."""
    up, relay, _ = hops("32M")
    rng = random.Random(7)
    model = bytearray(32 * MiB)
    h = nbd_connect(relay.uri)
    pending: dict[int, tuple[object, int, int]] = {}
    for i in range(1000):
        length = rng.choice([512, 4096, 65536, 200_000, MiB])
        offset = rng.randrange(0, 32 * MiB - length)
        if i % 3:
            data = rng.randbytes(length)
            # Writes never overlap requests in flight: then the model is exact.
            while any(o < offset + length and offset < o + n for _, o, n in pending.values()):
                h.poll(1)
                reap(h, pending, model)
            model[offset : offset + length] = data
            cookie = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), offset)
            pending[cookie] = (None, offset, length)
        else:
            buf = nbd.Buffer(length)
            pending[h.aio_pread(buf, offset)] = (buf, offset, length)
        while h.aio_in_flight() >= 64:
            h.poll(1)
            reap(h, pending, model)
    while pending:
        h.poll(1)
        reap(h, pending, model)
    assert sha(read_through(up.uri, 0, 32 * MiB)) == sha(model)
    assert relays(relay)


def reap(h, pending, model) -> None:
    for cookie in list(pending):
        if h.aio_command_completed(cookie):
            buf, offset, length = pending.pop(cookie)
            if buf is not None:
                got = bytes(buf.to_bytearray())
                # A read overlapping a write in flight may see either: only check the others.
                if not any(o < offset + length and offset < o + n for _, o, n in pending.values()):
                    assert got == model[offset : offset + length]


def test_relay_upstream_killed_under_load_every_request_answered(start_node, tmp_path):
    """Requests in flight when the upstream dies all complete (EIO or data), none hangs."""
    sock = str(tmp_path / "up.sock")
    up = start_node("memory", "64M", listen=f"unix:{sock}")
    relay = start_node("nbd", "relay=true", upstreams=[up.uri], env=INFO)
    h = nbd_connect(relay.uri)
    bufs = [nbd.Buffer(MiB) for _ in range(32)]
    cookies = [h.aio_pread(b, i * MiB) for i, b in enumerate(bufs)]
    up.kill()
    deadline = time.monotonic() + 20
    failed = 0
    for cookie in cookies:
        while True:
            try:
                if h.aio_command_completed(cookie):
                    break
            except nbd.Error as exc:
                assert exc.errnum == errno.EIO
                failed += 1
                break
            assert time.monotonic() < deadline, "a request hangs"
            h.poll(1)
    assert h.aio_is_ready()  # the client keeps its connection
    with pytest.raises(nbd.Error):
        h.pread(4096, 0)


def test_relay_retry_in_front_hides_the_outage(start_node, tmp_path):
    sock = str(tmp_path / "up.sock")
    up = start_node("memory", "8M", listen=f"unix:{sock}")
    relay = start_node("nbd", "relay=true", upstreams=[up.uri], env=INFO)
    retry = start_node("retry", "retries=150", "retry-delay=100ms", "retry-exponential=false",
                       upstreams=[relay.uri])  # fmt: skip
    h = nbd_connect(retry.uri)
    assert h.pread(4096, 0) == bytes(4096)
    up.kill()
    restart = threading.Timer(0.5, lambda: start_node("memory", "8M", listen=f"unix:{sock}"))
    restart.start()
    try:
        h.pwrite(b"t" * 4096, 0)  # fails at the relay while down, retried: no error here
        assert h.pread(4096, 0) == b"t" * 4096
    finally:
        restart.join()
    assert relays(relay)
    h.shutdown()
    for node in (retry, relay):  # before the upstream started last: it waits for its clients
        assert node.stop() == 0


def test_relay_sigterm_under_load_finishes_in_flight_then_exits_0(hops):
    up, relay, _ = hops("64M")
    h = nbd_connect(relay.uri)
    data = os.urandom(MiB)
    cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), i * MiB)
               for i in range(32)]  # fmt: skip
    relay.proc.send_signal(signal.SIGTERM)
    ok = shut = 0
    deadline = time.monotonic() + 30
    for cookie in cookies:
        while True:
            try:
                if h.aio_command_completed(cookie):
                    ok += 1
                    break
            except nbd.Error as exc:
                # Refused while draining, or never read before the node closed.
                assert exc.errnum in (errno.ESHUTDOWN, errno.ENOTCONN), exc
                shut += 1
                break
            assert time.monotonic() < deadline, "a request hangs"
            try:
                h.poll(1)
            except nbd.Error:
                pass  # the connection ended: aio_command_completed now says how, for each
    assert relay.proc.wait(20) == 0
    assert ok + shut == 32
    check = nbd_connect(up.uri)
    for i in range(ok):  # the ones that succeeded are there
        assert bytes(check.pread(4096, i * MiB)) == data[:4096]
    assert relays(relay)


def test_relay_client_vanishing_mid_request_leaves_others_alone(hops):
    _, relay, _ = hops("64M")
    other = nbd_connect(relay.uri)
    other.pwrite(b"o" * 4096, 0)
    for _ in range(3):
        gone = nbd_connect(relay.uri)
        for i in range(16):
            gone.aio_pread(nbd.Buffer(MiB), i * MiB)
        del gone  # closed with its requests in flight
    assert other.pread(4096, 0) == b"o" * 4096
    run(["nbdcopy", relay.uri, "null:"])
    assert "Traceback" not in relay.stderr()
    assert relays(relay, 5)


def test_relay_not_for_two_meta_contexts(start_node):
    """A client selecting two meta contexts is served by the normal path (see relay.py)."""
    up = start_node("memory", "8M")
    cow = start_node("cow", "cow-block-size=4K", "allocation-depth=true", upstreams=[up.uri])
    relay = start_node("nbd", "relay=true", upstreams=[cow.uri], env=INFO)
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.add_meta_context("qemu:allocation-depth")
    h.connect_uri(relay.uri)
    h.pwrite(b"w" * 4096, 0)
    seen: set[str] = set()
    h.block_status(65536, 0, lambda ctx, *a: seen.add(ctx) or 0)
    assert seen == {nbd.CONTEXT_BASE_ALLOCATION, "qemu:allocation-depth"}
    assert not relays(relay)
    one = nbd.NBD()
    one.add_meta_context("qemu:allocation-depth")
    one.connect_uri(relay.uri)
    got: list[list[int]] = []
    one.block_status(65536, 0, lambda ctx, off, ents, err: got.append(ents) or 0)
    assert got and got[0][:2] == [4096, 1]  # written in the cow's overlay: depth 1
    assert relays(relay)


def test_relay_renumbers_a_context_qemu_nbd_numbers_otherwise(start_node, tmp_path):
    """qemu-nbd numbers qemu:allocation-depth 1, we number it 2 (after base:allocation): the
    relayed chunk must carry ours, or the client cannot tell which context it answers."""
    image = tmp_path / "q.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", str(image), "8M"])
    sock = tmp_path / "q.sock"
    qemu = subprocess.Popen(
        ["qemu-nbd", "-k", str(sock), "-e", "8", "-A", "-f", "qcow2", str(image)]
    )
    try:
        wait_for(sock.exists, 10, "qemu-nbd")
        uri = f"nbd+unix:///?socket={sock}"
        relay = start_node("nbd", "relay=true", upstreams=[uri], env=INFO)
        h = nbd.NBD()
        h.add_meta_context("qemu:allocation-depth")
        h.connect_uri(relay.uri)
        h.pwrite(b"a" * 65536, MiB)
        seen: list[tuple[str, list[int]]] = []
        h.block_status(4 * MiB, 0, lambda ctx, off, ents, err: seen.append((ctx, ents)) or 0)
        assert [ctx for ctx, _ in seen] == ["qemu:allocation-depth"]
        assert seen[0][1][:4] == [MiB, 0, 65536, 1]  # absent, then local
        h.shutdown()
        maps = [run(["nbdinfo", "--map=qemu:allocation-depth", u]).stdout for u in (uri, relay.uri)]
        assert maps[0] == maps[1]
        assert relays(relay, 2)
    finally:
        qemu.terminate()
        qemu.wait()


@pytest.fixture
def paused_relay(start_node):
    """memory <- delay (writes take 1 s) <- relaying nbd node with gRPC control: (relay, stub)."""
    import grpc

    from nodes.control.rpc.nbdfabric.v1 import node_pb2_grpc as pb_grpc

    up = start_node("memory", "16M")
    slow = start_node("delay", "delay-write=1s", upstreams=[up.uri])
    relay = start_node("nbd", "relay=true", upstreams=[slow.uri], control=True, env=INFO)
    channel = grpc.insecure_channel(relay.control)
    yield relay, pb_grpc.NodeServiceStub(channel)
    channel.close()


def test_relay_pause_waits_for_requests_in_flight_upstream_and_holds_new_ones(paused_relay):
    """Pause returns once everything in flight is done or held (what a snapshot relies on):
    a write already sent upstream (1 s in the delay node) is finished first, though another
    is held meanwhile; the held one is counted in flight, as the normal path counts it, and
    served after resume."""
    from nodes.control.rpc.nbdfabric.v1 import node_pb2 as pb

    relay, stub = paused_relay
    h = nbd_connect(relay.uri)
    first = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"1" * 4096)), 0)
    wait_for(lambda: stub.GetStats(pb.GetStatsRequest(), timeout=5).in_flight == 1, 10, "sent")
    (upstream,) = stub.GetInfo(pb.GetInfoRequest(), timeout=5).upstreams
    assert json.loads(upstream.detail_json)["relayed"] == {"clients": 1, "down": 0, "in_flight": 1}
    paused = threading.Thread(target=lambda: stub.Pause(pb.PauseRequest(flush=True), timeout=30))
    paused.start()
    wait_for(
        lambda: stub.GetInfo(pb.GetInfoRequest(), timeout=5).state == pb.NODE_STATE_PAUSED,
        5,
        "pause",
    )
    second = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"2" * 4096)), 4096)
    paused.join(30)
    assert not paused.is_alive()
    stats = stub.GetStats(pb.GetStatsRequest(), timeout=5)
    write = next(o for o in stats.ops if o.op == "write")
    assert write.count == 1, "Pause returned before the write in flight upstream was done"
    assert stats.in_flight == 1  # the held one
    assert completed(h, [first, second], 0.5) == {first}
    stub.Resume(pb.ResumeRequest(), timeout=5)
    assert completed(h, [second], 10) == {second}
    assert h.pread(8192, 0) == b"1" * 4096 + b"2" * 4096
    assert relays(relay)
    h.shutdown()
    wait_for(
        lambda: (
            "relayed" not in stub.GetInfo(pb.GetInfoRequest(), timeout=5).upstreams[0].detail_json
        ),
        10,
        "the relayed client to be gone from the upstream's status",
    )


def test_relay_disc_while_paused_still_serves_the_held_requests(paused_relay):
    """A client that sends a request and then DISC while the node is paused: the held request
    is still served after resume (its reply is owed) and only then the DISC acted on, as the
    normal path does (reading stops while a request is held, so the DISC waits behind it)."""
    from nodes.control.rpc.nbdfabric.v1 import node_pb2 as pb

    relay, stub = paused_relay
    h = nbd_connect(relay.uri)
    stub.Pause(pb.PauseRequest(), timeout=5)
    cookie = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"3" * 4096)), 8192)
    wait_for(lambda: stub.GetStats(pb.GetStatsRequest(), timeout=5).in_flight == 1, 10, "held")
    h.aio_disconnect()  # DISC after the held write: its reply is still owed
    time.sleep(0.3)
    stub.Resume(pb.ResumeRequest(), timeout=5)
    assert completed(h, [cookie], 10) == {cookie}
    del h
    wait_for(lambda: stub.GetStats(pb.GetStatsRequest(), timeout=5).in_flight == 0, 10, "done")
    assert read_through(relay.uri, 8192, 4096) == b"3" * 4096


def test_relay_writes_queued_behind_a_stalled_upstream_arrive_intact(
    start_nbdkit, start_node, tmp_path
):
    """Small writes relayed straight from the node's read buffer (not copied into a buffer
    of their own) must be copied when the upstream socket does not take them at once: the
    read buffer is reused by the next read. An upstream that stops reading (nbdkit, one
    thread, paused by its pause filter) and the kernel's default send buffer
    (NBDFABRIC_UNIX_SNDBUF=0) leave megabytes of a burst of 32 KiB writes waiting; after
    resume every byte must be as written."""
    control = tmp_path / "pause.ctl"
    up = start_nbdkit(
        "--threads", "1", "--filter=pause", "memory", "64M", f"pause-control={control}"
    )
    relay = start_node("nbd", upstreams=[up.uri], env={**INFO, "NBDFABRIC_UNIX_SNDBUF": "0"})
    h = nbd_connect(relay.uri)
    h.pwrite(b"\0" * 4096, 0)  # connected and relaying before the upstream stops
    pause = ControlSocket(control)
    pause.send(b"p")
    assert pause.reply() == b"P"
    rng = random.Random(7)
    size, count = 32 * 1024, 400
    data = rng.randbytes(size * count)
    order = list(range(count))
    rng.shuffle(order)
    cookies = [
        h.aio_pwrite(
            nbd.Buffer.from_bytearray(bytearray(data[i * size : (i + 1) * size])), i * size
        )
        for i in order
    ]
    assert completed(h, cookies, 1.0) == set()  # held upstream, queued in the relay
    pause.send(b"r")
    assert pause.reply() == b"R"
    pause.sock.close()
    assert completed(h, cookies, 30) == set(cookies)
    assert sha(h.pread(size * count, 0)) == sha(data)
    assert relays(relay)
    h.shutdown()


def test_relay_serves_a_tls_client(start_node, tmp_path):
    """A client over TLS (STARTTLS to the relaying node, which decrypts) is relayed too: the
    upstream hop is plaintext, raw bytes as for any client. nbdcopy both ways over nbds://,
    checked against the upstream read directly."""
    from conftest import make_certificates

    pki = tmp_path / "pki"
    pki.mkdir()
    make_certificates(pki)
    up = start_node("memory", "16M")
    relay = start_node(
        "nbd", upstreams=[up.uri], extra=("--tls=require", "--tls-certificates", str(pki)),
        env=INFO,
    )  # fmt: skip
    secure = relay.uri.replace("nbd+unix://", "nbds+unix://") + f"&tls-certificates={pki}"
    data = random.Random(3).randbytes(8 * MiB)
    src, back = tmp_path / "src.img", tmp_path / "back.img"
    src.write_bytes(data)
    run(["nbdcopy", str(src), secure])
    assert read_through(up.uri, 0, 8 * MiB) == data
    run(["nbdcopy", secure, str(back)])
    assert sha(back.read_bytes()[: 8 * MiB]) == sha(data)
    assert relays(relay, 2)


def allocation_map(uri: str) -> list[tuple[int, int, int]]:
    """The export's base:allocation map, walked with block status, neighbours of one kind
    joined: (start, end, flags). Two servers may cut the same map differently."""
    h = nbd_connect(uri)
    out: list[tuple[int, int, int]] = []
    try:
        size, at = h.get_size(), 0
        got: list[int] = []
        while at < size:
            got.clear()
            h.block_status(size - at, at, lambda meta, off, entries, err: got.extend(entries))
            for length, flags in zip(got[::2], got[1::2], strict=True):
                end = min(at + length, size)
                if out and out[-1][1] == at and out[-1][2] == flags:
                    out[-1] = (out[-1][0], end, flags)
                else:
                    out.append((at, end, flags))
                at = end
    finally:
        h.shutdown()
    return out


@pytest.mark.parametrize("relay", ["true", "false"])
def test_relay_an_offset_window_matches_nbdkits_offset_filter(start_node, start_nbdkit, relay):
    """An offset node over a memory node, relaying (the default) or re-issuing, against
    `nbdkit --filter=offset nbd` over the same node: the same bytes, holes and map, and
    writes that land shifted. (An upstream's extent that runs past the window's end:
    test_relay_faults.)"""
    up = start_node("memory", "16M")
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x61 2M 2M", "-c", "write -P 0x62 6M 64k",
         "-c", "write -P 0x63 9M 512k", up.uri])  # fmt: skip
    window = ("offset=3M", "range=7M")  # upstream [3M, 10M); a hole from 9.5M to 16M
    ours = start_node("offset", *window, f"relay={relay}", upstreams=[up.uri], env=INFO)
    theirs = start_nbdkit("--filter=offset", "nbd", f"uri={up.uri}", *window)
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", ours.uri, theirs.uri])
    assert relays(ours) == (relay == "true"), ours.stderr()
    mapped = allocation_map(ours.uri)
    assert mapped == allocation_map(theirs.uri)
    assert mapped[-1] == (6 * MiB + 512 * 1024, 7 * MiB, 3), mapped
    # sparse reads keep their holes, at the window's offsets (the client checks each chunk)
    h = nbd_connect(ours.uri)
    kinds: list[tuple[int, int, int]] = []
    h.pread_structured(
        2 * MiB, 5 * MiB, lambda sub, off, st, err: kinds.append((off, len(sub), st))
    )
    assert sorted(kinds)[0][0] == 5 * MiB and sum(n for _, n, _ in kinds) == 2 * MiB
    assert {st for _, _, st in kinds} == {nbd.READ_DATA, nbd.READ_HOLE}, kinds
    h.pwrite(b"\x64" * 4096, 4 * MiB)  # the upstream's 7M
    h.flush()  # no offset to move: the upstream checks it is 0
    h.shutdown()
    direct = nbd_connect(up.uri)
    assert direct.pread(4096, 7 * MiB) == b"\x64" * 4096
    direct.shutdown()


def test_relay_a_partition_node_relays_its_partition(start_node, tmp_path):
    """partition=N relays too: a GPT disk's second partition written and read through the
    node, the bytes found at the partition's place in the disk, the rest of it untouched."""
    disk, parts = gpt_disk()
    path = tmp_path / "gpt.img"
    path.write_bytes(disk)
    first, count = (n * SECTOR for n in parts[2])
    up = start_node("file", str(path))
    part = start_node("partition", "partition=2", upstreams=[up.uri], env=INFO)
    payload = random.Random(7).randbytes(count)
    h = nbd_connect(part.uri)
    assert h.get_size() == count
    assert h.pread(count, 0) == disk[first : first + count]
    h.pwrite(payload, 0)
    assert h.pread(count, 0) == payload
    h.shutdown()
    assert relays(part), part.stderr()
    after = path.read_bytes()
    assert after[first : first + count] == payload
    assert after[:first] == disk[:first] and after[first + count :] == disk[first + count :]


def test_relay_an_offset_window_reconnects_and_keeps_its_shift(start_node, tmp_path):
    """An offset node's relay over a file node that is killed and started again: requests
    fail with EIO while it is down, and after the reconnect reads and writes still land at
    the window's place in the file (the shift is the relay's, not the connection's)."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(8 * MiB))
    sock = str(tmp_path / "up.sock")
    up = start_node("file", str(disk), listen=f"unix:{sock}")
    window = start_node("offset", "offset=3M", "range=4M", upstreams=[up.uri], env=INFO)
    h = nbd_connect(window.uri)
    h.pwrite(b"\x71" * 65536, MiB)  # the file's 4M
    up.kill()
    with pytest.raises(nbd.Error) as failed:
        h.pread(4096, 0)
    assert failed.value.errnum == errno.EIO
    start_node("file", str(disk), listen=f"unix:{sock}")

    def back() -> bool:
        try:
            return h.pread(65536, MiB) == b"\x71" * 65536
        except nbd.Error:
            return False

    wait_for(back, 20, "the window to serve again")
    h.pwrite(b"\x72" * 4096, 2 * MiB)  # the file's 5M, through the new upstream connection
    h.flush()
    h.shutdown()
    assert relays(window) and "is back" in window.stderr(), window.stderr()
    data = disk.read_bytes()
    assert data[4 * MiB : 4 * MiB + 65536] == b"\x71" * 65536
    assert data[5 * MiB : 5 * MiB + 4096] == b"\x72" * 4096
    assert data.count(0) == len(data) - 65536 - 4096


@pytest.mark.parametrize(
    ("args", "relayed"),
    [
        (("truncate=5M",), True),
        (("truncate=7M", "round-down=2M"), True),
        (("truncate=11M",), False),
    ],
)
def test_relay_a_truncate_node_relays_unless_it_grows(start_node, start_nbdkit, args, relayed):
    """truncate relays what lies within its upstream (a shrink, a rounding down: the window
    at 0, its last extent cut at the end), and re-issues when it grows the upstream (it
    answers past the upstream's end itself). Against nbdkit's truncate filter over the same
    memory node: the same bytes and map."""
    up = start_node("memory", "8M")
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x61 1M 1M", "-c", "write -P 0x62 4M 64k",
         "-c", "write -P 0x63 5M 2M", up.uri])  # fmt: skip
    ours = start_node("truncate", *args, upstreams=[up.uri], env=INFO)
    theirs = start_nbdkit("--filter=truncate", "nbd", f"uri={up.uri}", *args)
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", ours.uri, theirs.uri])
    assert allocation_map(ours.uri) == allocation_map(theirs.uri)
    assert relays(ours) == relayed, ours.stderr()
