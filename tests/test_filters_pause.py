"""The pause filter in real node processes: its control socket (nbdkit's one-byte protocol,
compared with nbdkit 1.32's replies byte for byte), requests held while paused and released by
resume (libnbd with many in flight, qemu-io), the `P` only once the requests in flight are done
(one held up in a delay node below), a snapshot of the disk below taken while paused, the same
pause through gRPC (`nbdfabric ctl`), clients that go away while held, and a stop while paused.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbd
import pytest
from conftest import NBDFABRIC, ROOT, Proc, nbd_connect, read_all, wait_for
from test_filters_policy import Control
from test_server_raw import Raw

StartNode = Callable[..., Proc]
KiB, MiB = 1024, 1024 * 1024
DISC = 2


def talk(path: str | Path, data: bytes, timeout: float = 10) -> bytes:
    """Send `data` on a control socket, close our side, return all it answers until it closes
    (nbdkit's and ours close once the commands before our end are answered)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while piece := s.recv(64):
            out += piece
        return out


class ControlSocket:
    """One control connection kept open: a command, then its reply."""

    def __init__(self, path: str | Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(20)
        self.sock.connect(str(path))

    def send(self, command: bytes) -> None:
        self.sock.sendall(command)

    def reply(self) -> bytes:
        return self.sock.recv(1)

    def pending(self) -> bool:
        """No reply has come yet (looked at without waiting)."""
        self.sock.setblocking(False)
        try:
            return not self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(20)

    def close(self) -> None:
        self.sock.close()


def ctl(control: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*NBDFABRIC, "ctl", control, *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def chain(start_node: StartNode, tmp_path: Path, *between: str) -> tuple[Proc, Proc, Path]:
    """memory of 1M (a pattern) [-> a node KIND PARAMS... of `between`] -> pause: (the memory
    node, the pause node, its control socket)."""
    disk = start_node("memory", "1M")
    h = nbd_connect(disk.uri)
    h.pwrite(pattern(MiB), 0)
    h.shutdown()
    up = disk.uri
    if between:
        up = start_node(between[0], *between[1:], upstreams=[disk.uri], control=True).uri
    sock = tmp_path / "pause.ctl"
    node = start_node("pause", f"pause-control={sock}", upstreams=[up], control=True)
    return disk, node, sock


def pattern(size: int) -> bytes:
    return bytes(i * 7 % 251 for i in range(size))


def buffer(data: bytes) -> nbd.Buffer:
    return nbd.Buffer.from_bytearray(bytearray(data))


def completed(h: Any, cookies: list[int], seconds: float) -> set[int]:
    """The cookies of those commands done within `seconds` (libnbd polled meanwhile)."""
    done: set[int] = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(done) < len(cookies):
        h.poll(50)
        done |= {c for c in cookies if c not in done and h.aio_command_completed(c)}
    return done


def pause_status(control: Control) -> dict[str, Any]:
    status: dict[str, Any] = control.status()["pause"]
    return status


def in_flight(control: Control) -> int:
    from nodes.control.rpc.nbdfabric.v1 import node_pb2 as pb

    return int(control.stub.GetStats(pb.GetStatsRequest(), timeout=10).in_flight)


def held(control: Control, n: int) -> bool:
    return in_flight(control) == n and pause_status(control)["held"] == n


# The control socket, against nbdkit's --------------------------------------------------------

#: Conversations on one connection each: what is sent (then our end closed).
CONVERSATIONS = [b"p", b"pp", b"r", b"rr", b"prp", b"r", b"pr", b"p\n", b"r\r\n", b"xr\n",
                 b"P", b"R", b"", b" \t\n", b"\x00", b"pause", b"r"]  # fmt: skip


def test_pause_control_replies_as_nbdkit(
    start_node: StartNode, start_nbdkit: Callable[..., Proc], tmp_path: Path
) -> None:
    """p, r, repeated commands, unknown bytes, the whitespace nbdkit skips, every byte value
    alone, and commands on a connection kept open: the same bytes back as nbdkit 1.32's."""
    theirs_sock = tmp_path / "nbdkit.ctl"
    start_nbdkit("--filter=pause", "memory", "1M", f"pause-control={theirs_sock}")
    _, node, ours_sock = chain(start_node, tmp_path)
    for data in CONVERSATIONS:
        theirs = talk(theirs_sock, data)
        assert talk(ours_sock, data) == theirs, data
    assert talk(ours_sock, b"prp") == b"PRP" and talk(ours_sock, b"r") == b"R"
    for byte in range(256):
        one = bytes([byte])
        assert talk(ours_sock, one) == talk(theirs_sock, one), one
    for path in (ours_sock, theirs_sock):  # commands answered one by one, the connection open
        c = ControlSocket(path)
        replies = []
        for command in (b"p", b"p", b"q", b"r"):
            c.send(command)
            replies.append(c.reply())
        c.close()
        assert replies == [b"P", b"P", b"X", b"R"], path
    assert not Control(node).status()["pause"]["paused"]


# Held requests and resume --------------------------------------------------------------------


def test_pause_holds_requests_until_resume(start_node: StartNode, tmp_path: Path) -> None:
    """Requests sent while paused (libnbd, many in flight) stay pending, reach nothing below
    (the memory node, read directly, is unchanged), are counted as held by `ctl info`; resume
    completes every one with the right data."""
    disk, node, sock = chain(start_node, tmp_path)
    control = Control(node)
    h = nbd_connect(node.uri)
    assert talk(sock, b"p") == b"P"
    rng = random.Random(7)
    writes = {i * 64 * KiB: rng.randbytes(16 * KiB) for i in range(8)}
    cookies = [h.aio_pwrite(buffer(data), off) for off, data in writes.items()]
    reads = [nbd.Buffer(4 * KiB) for _ in range(4)]
    cookies += [h.aio_pread(buf, 4 * KiB + i * 64 * KiB) for i, buf in enumerate(reads)]
    wait_for(lambda: held(control, len(cookies)), 20, "the requests to be held")
    assert completed(h, cookies, 0.3) == set()
    assert read_all(disk.uri) == pattern(MiB), "a held write reached the disk"

    info = json.loads(ctl(node.control or "", "info", "--json").stdout)
    assert info["state"] == "paused"
    assert info["status"]["pause"] == {"control": str(sock), "paused": True, "held": 12}
    table = ctl(node.control or "", "info").stdout
    assert '"held": 12' in table and "paused" in table

    assert talk(sock, b"r") == b"R"
    assert completed(h, cookies, 20) == set(cookies)
    image = bytearray(pattern(MiB))
    for off, data in writes.items():
        image[off : off + len(data)] = data
    for i, buf in enumerate(reads):  # 4K into each block: the writes to it came first
        off = 4 * KiB + i * 64 * KiB
        assert buf.to_bytearray() in (image[off : off + 4 * KiB], pattern(MiB)[off : off + 4 * KiB])
    assert h.pread(MiB, 0) == image and read_all(disk.uri) == image
    assert pause_status(control) == {"control": str(sock), "paused": False, "held": 0}
    assert json.loads(ctl(node.control or "", "info", "--json").stdout)["state"] == "serving"
    h.shutdown()


def test_pause_holds_a_qemu_io_write(start_node: StartNode, tmp_path: Path) -> None:
    """qemu-io writing while paused does not finish (still running after a while, its write
    held); resume lets it finish, and its write is there."""
    disk, node, sock = chain(start_node, tmp_path)
    control = Control(node)
    assert talk(sock, b"p") == b"P"
    qemu = subprocess.Popen(
        ["qemu-io", "-f", "raw", "-t", "writeback", node.uri,
         "-c", "write -P 0x5a 128K 64K", "-c", "read -P 0x5a 128K 64K"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: held(control, 1), 20, "qemu-io's write to be held")
        with pytest.raises(subprocess.TimeoutExpired):
            qemu.wait(0.3)
        assert read_all(disk.uri)[128 * KiB : 192 * KiB] == pattern(MiB)[128 * KiB : 192 * KiB]
        assert talk(sock, b"r") == b"R"
        out, _ = qemu.communicate(timeout=30)
    finally:
        qemu.kill()
    assert qemu.returncode == 0, out
    assert "Pattern verification failed" not in out
    assert read_all(disk.uri)[128 * KiB : 192 * KiB] == b"\x5a" * 64 * KiB


# The P waits for requests in flight ----------------------------------------------------------


@pytest.mark.parametrize("how", ["socket", "ctl"])
def test_pause_answers_once_requests_in_flight_are_done(
    start_node: StartNode, tmp_path: Path, how: str
) -> None:
    """A read held up 2 s in a delay node below the pause node is in flight when the pause is
    asked for: the answer (`P`, or `ctl pause` returning) comes only once that read is done
    below (the delay node counts it) and answered; a read sent after the pause is held."""
    _, node, sock = chain(start_node, tmp_path, "delay", "delay-read=2s")
    control = Control(node)
    delay = Control(Proc(proc=node.proc, uri="", control=_delay_control(tmp_path)))
    h = nbd_connect(node.uri)
    first = nbd.Buffer(4 * KiB)
    early = h.aio_pread(first, 0)
    wait_for(lambda: in_flight(delay) == 1, 20, "the read to be in the delay")

    if how == "socket":
        c = ControlSocket(sock)
        c.send(b"p")
        assert c.reply() == b"P"
        c.close()
    else:
        res = ctl(node.control or "", "pause")
        assert res.returncode == 0, res.stderr
    # Done below, and answered: not just some time later.
    assert delay.ops("read")[0] == 1, "paused while a request was still in flight below"
    assert in_flight(delay) == 0 and in_flight(control) == 0
    assert completed(h, [early], 10) == {early}
    assert first.to_bytearray() == pattern(4 * KiB)

    later = h.aio_pread(nbd.Buffer(4 * KiB), 8 * KiB)
    wait_for(lambda: held(control, 1), 20, "the later read to be held")
    assert completed(h, [later], 0.3) == set()
    assert delay.ops("read")[0] == 1, "a read sent while paused reached the node below"
    if how == "socket":
        assert ctl(node.control or "", "resume").returncode == 0  # either lifts the other's
    else:
        assert talk(sock, b"r") == b"R"
    assert completed(h, [later], 20) == {later}
    h.shutdown()


def _delay_control(tmp_path: Path) -> str:
    """The control address of the delay node (its ready file says)."""
    for ready in sorted(tmp_path.glob("node*.json")):
        info = json.loads(ready.read_text())
        if info.get("kind") == "delay":
            return str(info["control"])
    raise AssertionError("no delay node")


# The snapshot use case -----------------------------------------------------------------------


def test_pause_snapshot_of_the_file_below_is_what_was_acknowledged(
    start_node: StartNode, tmp_path: Path
) -> None:
    """file -> delay -> pause: writes in flight when `p` is sent; once `P` comes the file is copied
    directly. Its checksum is that of the image with every write acknowledged by then, and
    writes sent after the pause (to the same blocks) are not in it; after `r` they are."""
    image = bytearray(random.Random(1).randbytes(MiB))
    disk_path = tmp_path / "disk.img"
    disk_path.write_bytes(image)
    disk = start_node("file", str(disk_path))
    slow = start_node("delay", "delay-write=1s", upstreams=[disk.uri])  # still in flight
    sock = tmp_path / "pause.ctl"
    node = start_node("pause", f"pause-control={sock}", upstreams=[slow.uri], control=True)
    control = Control(node)
    h = nbd_connect(node.uri)
    rng = random.Random(2)
    before = {rng.randrange(0, MiB // 4096) * 4096: rng.randbytes(4096) for _ in range(32)}
    cookies = [h.aio_pwrite(buffer(data), off) for off, data in before.items()]

    def all_sent() -> bool:
        h.poll(0)  # libnbd sends what the socket did not take at once
        return in_flight(control) == len(before)

    wait_for(all_sent, 20, "the writes to be in flight")
    c = ControlSocket(sock)
    c.send(b"p")  # while those are in flight (in the delay)
    assert c.reply() == b"P"
    snapshot = hashlib.sha256(disk_path.read_bytes()).hexdigest()
    after = {off: rng.randbytes(4096) for off in list(before)[:8]}
    held_cookies = [h.aio_pwrite(buffer(data), off) for off, data in after.items()]
    # Every write sent before the pause is acknowledged: the P came after them.
    assert completed(h, cookies, 20) == set(cookies)
    wait_for(lambda: held(control, len(after)), 20, "the later writes to be held")
    assert completed(h, held_cookies, 0.2) == set()
    for off, data in before.items():
        image[off : off + 4096] = data
    assert snapshot == hashlib.sha256(image).hexdigest()
    assert hashlib.sha256(disk_path.read_bytes()).hexdigest() == snapshot  # still nothing new

    c.send(b"r")
    assert c.reply() == b"R"
    c.close()
    assert completed(h, held_cookies, 20) == set(held_cookies)
    for off, data in after.items():
        image[off : off + 4096] = data
    h.flush()
    assert disk_path.read_bytes() == image
    h.shutdown()


# Clients that go away, a stop while paused ---------------------------------------------------


def test_pause_client_gone_while_held_leaves_nothing_behind(
    start_node: StartNode, tmp_path: Path
) -> None:
    """A client closes its unix socket while its writes are held: they are dropped unserved,
    its connection ends while the node is still paused (nothing held or in flight, no session
    open), a new pause answers at once, and after resume the node serves on, the dropped
    writes never having reached the disk."""
    disk, node, sock = chain(start_node, tmp_path)
    control = Control(node)
    assert talk(sock, b"p") == b"P"
    h = nbd_connect(node.uri)
    for i in range(6):
        h.aio_pwrite(buffer(b"\xee" * 4096), i * 4096)
    wait_for(lambda: held(control, 6), 20, "the writes to be held")
    del h  # closes the socket, no NBD_CMD_DISC

    from nodes.control.rpc.nbdfabric.v1 import node_pb2 as pb

    def gone() -> bool:
        stats = control.stub.GetStats(pb.GetStatsRequest(), timeout=10)
        return stats.connections_open == 0 and stats.in_flight == 0

    wait_for(gone, 20, "the connection to end while paused")
    assert pause_status(control) == {"control": str(sock), "paused": True, "held": 0}
    assert talk(sock, b"p") == b"P"
    assert talk(sock, b"r") == b"R"
    g = nbd_connect(node.uri)
    assert g.pread(6 * 4096, 0) == pattern(6 * 4096)
    g.shutdown()
    assert read_all(disk.uri) == pattern(MiB)


def test_pause_after_disc_held_requests_are_still_answered(
    start_node: StartNode, tmp_path: Path
) -> None:
    """A client sends a write and NBD_CMD_DISC while paused, and waits: its write is owed a
    reply (the spec: a server finishes what came before DISC), so it stays held, and resume
    answers it, then the connection closes."""
    disk, node, sock = chain(start_node, tmp_path)
    control = Control(node)
    assert talk(sock, b"p") == b"P"
    raw = Raw(node.socket)
    raw.handshake()
    raw.request(1, 8192, 4096, cookie=9, payload=b"\x77" * 4096)
    raw.request(DISC, cookie=10)
    wait_for(lambda: held(control, 1), 20, "the write to be held")
    raw.sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        raw.sock.recv(1)
    raw.sock.settimeout(20)
    assert talk(sock, b"r") == b"R"
    assert raw.reply() == (9, 0, b"")
    assert raw.sock.recv(1) == b""  # then closed
    raw.sock.close()
    assert read_all(disk.uri)[8192 : 8192 + 4096] == b"\x77" * 4096


def test_pause_sigterm_while_paused_serves_held_requests_and_exits(
    start_node: StartNode, tmp_path: Path
) -> None:
    """SIGTERM to a paused node: it exits 0 (nbdkit 1.32 waits for an `r`); the held write,
    sent before the signal, is served as requests in flight are and lands below; the control
    socket file is gone."""
    disk, node, sock = chain(start_node, tmp_path)
    control = Control(node)
    assert talk(sock, b"p") == b"P"
    h = nbd_connect(node.uri)
    cookie = h.aio_pwrite(buffer(b"\x42" * 4096), 0)
    wait_for(lambda: held(control, 1), 20, "the write to be held")
    node.proc.send_signal(signal.SIGTERM)
    assert completed(h, [cookie], 20) == {cookie}
    assert node.proc.wait(20) == 0
    assert read_all(disk.uri)[:4096] == b"\x42" * 4096
    assert not sock.exists()


# Start-up and the control socket's file ------------------------------------------------------


def test_pause_replaces_a_stale_socket_and_refuses_other_files(
    start_node: StartNode, tmp_path: Path
) -> None:
    """A socket file left behind (its node killed) is replaced, as nbdkit replaces it; a
    regular file or a directory at the path is refused, exit 1 naming pause-control, and left
    alone; a node stopped removes its socket file."""
    disk = start_node("memory", "1M")
    stale = tmp_path / "stale.ctl"
    left = socket.socket(socket.AF_UNIX)
    left.bind(str(stale))
    left.close()  # the file stays, nobody listens
    node = start_node("pause", f"pause-control={stale}", upstreams=[disk.uri])
    assert talk(stale, b"pr") == b"PR"
    assert node.stop() == 0 and not stale.exists()

    regular = tmp_path / "regular.ctl"
    regular.write_text("keep me")
    (tmp_path / "dir.ctl").mkdir()
    for path in (regular, tmp_path / "dir.ctl"):
        res = subprocess.run(
            [*NBDFABRIC, "node", "pause", f"pause-control={path}", "--upstream", disk.uri,
             "--listen", f"unix:{tmp_path}/x.sock"],
            cwd=ROOT, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert res.returncode == 1, res.stderr
        assert "pause-control" in res.stderr and "not a socket" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
    assert regular.read_text() == "keep me"
    res = subprocess.run(
        [*NBDFABRIC, "node", "pause", "--upstream", disk.uri], cwd=ROOT, capture_output=True,
        text=True, timeout=30,
    )  # fmt: skip
    assert res.returncode == 1 and "'pause-control' is required" in res.stderr, res.stderr


def test_pause_relative_socket_path_and_side_by_side_connections(
    start_node: StartNode, tmp_path: Path
) -> None:
    """A relative pause-control is taken from where the node starts; a control connection kept
    open idle does not stop another from being answered (nbdkit would make it wait)."""
    disk = start_node("memory", "1M")
    rel = os.path.relpath(tmp_path / "rel.ctl", ROOT)
    node = start_node("pause", f"pause-control={rel}", upstreams=[disk.uri], control=True)
    assert pause_status(Control(node))["control"] == str(tmp_path / "rel.ctl")
    idle = ControlSocket(tmp_path / "rel.ctl")
    assert talk(tmp_path / "rel.ctl", b"p") == b"P"
    assert idle.pending()
    idle.send(b"r")
    assert idle.reply() == b"R"
    idle.close()
