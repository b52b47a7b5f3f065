"""`file dir=DIRECTORY`: one export per regular file or block device in a directory, checked with
real clients (nbdinfo, qemu-img, qemu-io, libnbd, a raw socket) and beside `nbdkit file dir=` on
the same directory.

The directory of every test holds two images, a subdirectory, a FIFO, a unix socket, a symbolic
link to a file outside it and a dangling link: the images and the link are exports, the rest is
not, and no export name leads out of the directory.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import nbd
import pytest
from conftest import NBDFABRIC, ROOT, Proc, nbd_connect, run, wait_for

from nodes.plugins.file import MAX_IDLE_FILES, DirectoryFile, File, FileDirectory, FileParams

MiB = 1024 * 1024
EXPORTS = ["a.img", "b.img", "link"]
#: Names no client may open: the default export, paths, the directory's own entries, what is not
#: a regular file or block device (after following links), what is not there.
REFUSED = ["", "/etc/passwd", "../outside.txt", "./a.img", "a.img/", ".", "..", "sub",
           "fifo", "sock", "dangling", "nope", "sub/inner.img"]  # fmt: skip

IHAVEOPT, OPT_REPLY_MAGIC = 0x49484156454F5054, 0x3E889045565A9
OPT_INFO, OPT_GO = 6, 7
REP_ACK, REP_INFO = 1, 3
REP_ERR_INVALID, REP_ERR_UNKNOWN = (1 << 31) | 3, (1 << 31) | 6


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    d = tmp_path / "disks"
    d.mkdir()
    (d / "a.img").write_bytes(b"A" * MiB)
    (d / "b.img").write_bytes(b"B" * (2 * MiB))
    (d / "sub").mkdir()
    (d / "sub" / "inner.img").write_bytes(b"I" * 4096)
    os.mkfifo(d / "fifo")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(d / "sock"))
    (tmp_path / "outside.txt").write_bytes(b"O" * 4096)
    (d / "link").symlink_to("../outside.txt")
    (d / "dangling").symlink_to("nowhere")
    return d


def uri(node: Proc, name: str) -> str:
    return f"nbd+unix:///{quote(name)}?socket={node.socket}"


def listed(node: Proc) -> dict[str, int]:
    """`nbdinfo --list --json`: export name -> size."""
    out = json.loads(run(["nbdinfo", "--list", "--json", node.uri]).stdout)
    return {e["export-name"]: e["export-size"] for e in out["exports"]}


def refused(node: Proc, name: str) -> bool:
    """True if libnbd cannot open export `name` (NBD_OPT_GO fails)."""
    h = nbd.NBD()
    h.set_export_name(name)
    try:
        h.connect_unix(node.socket)
    except nbd.Error:
        return True
    h.shutdown()
    return False


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def qemu_io(target: str, *commands: str) -> None:
    run(["qemu-io", "-f", "raw", "-t", "writeback", target, *(a for c in commands for a in ("-c", c))])  # fmt: skip  # noqa: E501


def open_fds(pid: int) -> list[str]:
    fds = Path(f"/proc/{pid}/fd")
    out = []
    for fd in fds.iterdir():
        try:
            out.append(os.readlink(fd))
        except OSError:
            continue
    return out


# Listing ------------------------------------------------------------------------------------


def test_dir_lists_the_files_as_nbdkit_does(
    directory: Path, start_node: Callable[..., Proc], start_nbdkit: Callable
) -> None:
    ours = start_node("file", f"dir={directory}")
    theirs = start_nbdkit("file", f"dir={directory}")
    sizes = {"a.img": MiB, "b.img": 2 * MiB, "link": 4096}
    assert listed(ours) == listed(theirs) == sizes
    text = run(["nbdinfo", "--list", ours.uri]).stdout
    assert all(f'export="{name}"' in text for name in EXPORTS)
    assert "fifo" not in text and "sub" not in text and "dangling" not in text


@pytest.fixture
def unwritable_b(directory: Path) -> Iterator[Path]:
    """b.img made unwritable: immutable for root (who may write any mode), else by mode."""
    b = directory / "b.img"
    if os.geteuid() == 0:
        run(["chattr", "+i", str(b)])
        yield b
        run(["chattr", "-i", str(b)])
    else:
        b.chmod(0o444)
        yield b


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    """A loop device over a 4 MiB file of 0x99 (as in test_plugin_file.py)."""
    if shutil.which("losetup") is None:
        pytest.skip("losetup is not installed")
    backing = tmp_path / "loop.img"
    backing.write_bytes(b"\x99" * (4 * MiB))
    res = run(["losetup", "--find", "--show", str(backing)], check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot create a loop device here: {res.stderr.strip()}")
    yield res.stdout.strip()
    run(["losetup", "-d", res.stdout.strip()], check=False)


def test_dir_serves_block_devices_in_it(
    directory: Path, loop_device: str, start_node: Callable[..., Proc], start_nbdkit: Callable
) -> None:
    (directory / "disk").symlink_to(loop_device)  # a link to a block device
    if os.geteuid() == 0:  # and a block device node right in the directory
        os.mknod(directory / "node", stat.S_IFBLK | 0o600, os.stat(loop_device).st_rdev)
    names = sorted([*EXPORTS, "disk", *(["node"] if os.geteuid() == 0 else [])])
    ours = start_node("file", f"dir={directory}")
    assert sorted(listed(ours)) == sorted(listed(start_nbdkit("file", f"dir={directory}")))
    assert sorted(listed(ours)) == names and listed(ours)["disk"] == 4 * MiB
    qemu_io(uri(ours, "disk"), "read -P 0x99 0 4M", "write -P 0x44 1M 64k", "flush")
    qemu_io(uri(ours, names[-1]), "read -P 0x44 1M 64k")


def test_dir_exports_have_their_own_size_and_flags(
    directory: Path, unwritable_b: Path, start_node: Callable[..., Proc]
) -> None:
    node = start_node("file", f"dir={directory}")
    a = json.loads(run(["nbdinfo", "--json", uri(node, "a.img")]).stdout)["exports"][0]
    b = json.loads(run(["nbdinfo", "--json", uri(node, "b.img")]).stdout)["exports"][0]
    assert (a["export-name"], a["export-size"], a["is_read_only"]) == ("a.img", MiB, False)
    assert (b["export-name"], b["export-size"], b["is_read_only"]) == ("b.img", 2 * MiB, True)
    assert a["can_flush"] and a["can_multi_conn"] and a["can_trim"] and not b["can_trim"]
    ro = start_node("file", f"dir={directory}", extra=("--read-only",))
    a = json.loads(run(["nbdinfo", "--json", uri(ro, "a.img")]).stdout)["exports"][0]
    assert a["is_read_only"] and not a["can_trim"] and not a["can_zero"]


def test_dir_sees_files_added_and_removed_after_start(
    directory: Path, start_node: Callable[..., Proc]
) -> None:
    node = start_node("file", f"dir={directory}")
    assert sorted(listed(node)) == EXPORTS
    (directory / "c.img").write_bytes(b"C" * 8192)
    assert listed(node)["c.img"] == 8192
    assert nbd_connect(uri(node, "c.img")).pread(4, 0) == b"CCCC"
    (directory / "a.img").unlink()
    assert sorted(listed(node)) == ["b.img", "c.img", "link"]
    # The removed file was open (listed with its size): the listing closed it, its space is free.
    assert not [p for p in open_fds(node.pid) if p.endswith("a.img (deleted)")]
    assert refused(node, "a.img")


def test_dir_a_replaced_file_serves_old_clients_the_old_one_until_they_leave(
    directory: Path, start_node: Callable[..., Proc]
) -> None:
    node = start_node("file", f"dir={directory}")
    old = nbd_connect(uri(node, "a.img"))
    assert old.pread(4, 0) == b"AAAA"
    (directory / "a.img").unlink()
    (directory / "a.img").write_bytes(b"N" * 4096)  # a new file (inode) of the same name
    new = nbd_connect(uri(node, "a.img"))
    assert (new.pread(4, 0), new.get_size()) == (b"NNNN", 4096)
    assert (old.pread(4, 0), old.get_size()) == (b"AAAA", MiB)
    assert [p for p in open_fds(node.pid) if p.endswith("a.img (deleted)")]
    old.shutdown()
    wait_for(
        lambda: not [p for p in open_fds(node.pid) if p.endswith("a.img (deleted)")],
        10,
        "the replaced file to be closed after its last client",
    )
    assert new.pread(4, 4092) == b"NNNN"
    new.shutdown()


# Data ---------------------------------------------------------------------------------------


def test_dir_writes_reach_the_chosen_file(
    directory: Path, tmp_path: Path, start_node: Callable[..., Proc]
) -> None:
    node = start_node("file", f"dir={directory}")
    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(2 * MiB))
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), uri(node, "b.img")])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", uri(node, "b.img"), str(source)])
    qemu_io(uri(node, "a.img"), "write -P 0x11 4096 4096", "read -P 0x11 4096 4096")
    qemu_io(uri(node, "link"), "write -P 0x22 0 512")
    assert sha(directory / "b.img") == sha(source)
    assert (directory / "a.img").read_bytes() == b"A" * 4096 + b"\x11" * 4096 + b"A" * (MiB - 8192)
    assert (tmp_path / "outside.txt").read_bytes() == b"\x22" * 512 + b"O" * (4096 - 512)
    assert not (directory / "sub" / "inner.img").read_bytes().strip(b"I")  # untouched


def test_dir_two_exports_at_once(directory: Path, start_node: Callable[..., Proc]) -> None:
    node = start_node("file", f"dir={directory}")
    a, b = nbd_connect(uri(node, "a.img")), nbd_connect(uri(node, "b.img"))
    a2 = nbd_connect(uri(node, "a.img"))  # a second connection shares the open file
    for i in range(16):
        a.pwrite(bytes([i]) * 4096, i * 4096)
        b.pwrite(bytes([0x80 + i]) * 4096, i * 4096)
    assert a2.pread(4096, 15 * 4096) == bytes([15]) * 4096
    assert (a.get_size(), b.get_size()) == (MiB, 2 * MiB)
    for h in (a, b, a2):
        h.flush()
        h.shutdown()
    data_a, data_b = (directory / "a.img").read_bytes(), (directory / "b.img").read_bytes()
    assert data_a[: 16 * 4096] == b"".join(bytes([i]) * 4096 for i in range(16))
    assert data_b[: 16 * 4096] == b"".join(bytes([0x80 + i]) * 4096 for i in range(16))
    assert data_a[16 * 4096 :] == b"A" * (MiB - 16 * 4096)


# Refusals -----------------------------------------------------------------------------------


def test_dir_refuses_names_outside_or_not_files_and_serves_on(
    directory: Path, start_node: Callable[..., Proc], start_nbdkit: Callable
) -> None:
    ours = start_node("file", f"dir={directory}")
    theirs = start_nbdkit("file", f"dir={directory}")
    for name in REFUSED:
        assert refused(ours, name), name
        assert refused(theirs, name), name  # nbdkit refuses them too
    for name in EXPORTS:
        assert not refused(ours, name), name
    assert ours.proc.poll() is None
    assert nbd_connect(uri(ours, "a.img")).pread(4, 0) == b"AAAA"


class Raw:
    """Just enough of a client to send export names libnbd will not (NUL, over 4096 bytes)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(20)
        self.sock.connect(path)
        self.recv(18)  # greeting
        self.sock.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes

    def recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            piece = self.sock.recv(n - len(out))
            if not piece:
                raise ConnectionError("closed")
            out += piece
        return out

    def ask(self, option: int, name: bytes) -> list[int]:
        """Send INFO/GO for `name`; the reply types up to the final one."""
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)
        reps = []
        while True:
            magic, _, rep, length = struct.unpack(">QIII", self.recv(20))
            assert magic == OPT_REPLY_MAGIC
            self.recv(length)
            reps.append(rep)
            if rep == REP_ACK or rep & (1 << 31):
                return reps


def test_dir_raw_names_get_the_protocols_errors(
    directory: Path, start_node: Callable[..., Proc]
) -> None:
    node = start_node("file", f"dir={directory}")
    raw = Raw(node.socket)
    for name in [b"", b"../outside.txt", b"/etc/passwd", b"sub", b"fifo", b"x" * 4096]:
        for option in (OPT_INFO, OPT_GO):
            assert raw.ask(option, name) == [REP_ERR_UNKNOWN], (option, name)
    for name in [b"a.img\0", b"a.img\0/../../etc/passwd", b"a" * 4097, b"\xff.img"]:
        assert raw.ask(OPT_GO, name) == [REP_ERR_INVALID], name  # not a valid NBD string
    assert raw.ask(OPT_INFO, b"a.img") == [REP_INFO, REP_INFO, REP_ACK]  # export + block size
    assert raw.ask(OPT_GO, b"a.img")[-1] == REP_ACK
    raw.sock.close()
    assert nbd_connect(uri(node, "b.img")).pread(4, 0) == b"BBBB"


# Chains, workers, control -------------------------------------------------------------------


def test_dir_export_as_the_upstream_of_a_filter(
    directory: Path, start_node: Callable[..., Proc]
) -> None:
    node = start_node("file", f"dir={directory}")
    cow = start_node("cow", upstreams=[uri(node, "b.img")])
    h = nbd_connect(cow.uri)
    assert (h.get_size(), h.pread(4, 0)) == (2 * MiB, b"BBBB")
    h.pwrite(b"W" * 4096, 0)  # lands in the overlay, not in the file
    assert h.pread(4, 0) == b"WWWW"
    h.shutdown()
    assert (directory / "b.img").read_bytes() == b"B" * (2 * MiB)


def test_dir_with_workers_each_worker_opens_the_files(
    directory: Path, start_node: Callable[..., Proc]
) -> None:
    node = start_node("file", f"dir={directory}", extra=("--workers", "2"))
    assert sorted(listed(node)) == EXPORTS
    handles = [nbd_connect(uri(node, name)) for name in ("a.img", "b.img") for _ in range(3)]
    for i, h in enumerate(handles):
        h.pwrite(bytes([i]) * 512, i * 512)
        h.flush()
    assert handles[0].pread(512 * 3, 0) == b"".join(bytes([i]) * 512 for i in range(3))
    for h in handles:
        h.shutdown()
    assert (directory / "b.img").read_bytes()[1536:3072] == b"".join(
        bytes([i]) * 512 for i in range(3, 6)
    )
    assert refused(node, "") and refused(node, "../outside.txt")


def test_dir_control_info_pause_flush_and_flush(
    directory: Path, start_node: Callable[..., Proc]
) -> None:
    node = start_node("file", f"dir={directory}", control=True)
    h = nbd_connect(uri(node, "a.img"))
    h.pwrite(b"x" * 4096, 0)

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([*NBDFABRIC, "ctl", node.control or "", *args], cwd=ROOT,
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        assert res.returncode == 0, res.stderr
        return res

    info = json.loads(ctl("info", "--json").stdout)
    status = info["status"]
    assert info["size"] == 0 and status["exports"] == EXPORTS
    assert status["open"]["a.img"]["connections"] == 1
    # The node says it serves several exports, and which: as NBD_OPT_LIST lists them.
    assert info["serves_several"] is True
    assert [e["name"] for e in info["exports"]] == list(listed(node)) == EXPORTS
    table = ctl("info").stdout.splitlines()
    assert not any(line.startswith(("size ", "export ")) for line in table), table
    shown = [line.split("│")[-1].strip() for line in table if "│" in line]
    assert shown[shown.index("a.img") :][: len(EXPORTS)] == EXPORTS, table
    ctl("pause", "--flush")
    ctl("resume")
    ctl("flush")
    assert h.pread(4, 0) == b"xxxx"
    h.shutdown()


# Params and options -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["file=/x.img", "dir=/tmp"], "give file= or dir=, not both (file='/x.img', dir='/tmp')"),
        (["/x.img", "dir=/tmp"], "not both (file='/x.img', dir='/tmp')"),
        ([], "give file=FILENAME (or a bare FILENAME) or dir=DIRECTORY"),
        (["dir=/etc/passwd"], "dir=/etc/passwd: Not a directory"),
        (["dir=/no/such/dir"], "dir=/no/such/dir: No such file or directory"),
    ],
)
def test_dir_bad_params_exit_1_naming_them(args: list[str], message: str, tmp_path: Path) -> None:
    res = subprocess.run(
        [*NBDFABRIC, "node", "file", *args, "--listen", f"unix:{tmp_path}/n.sock"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert res.returncode == 1 and message in res.stderr, res.stderr


def test_dir_takes_no_export_name(directory: Path, tmp_path: Path) -> None:
    res = subprocess.run(
        [*NBDFABRIC, "node", "file", f"dir={directory}", "--export-name", "a.img",
         "--listen", f"unix:{tmp_path}/n.sock"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert res.returncode == 1 and "--export-name 'a.img'" in res.stderr, res.stderr
    assert "serves several exports" in res.stderr


def test_dir_param_is_shown_by_kinds() -> None:
    res = run([*NBDFABRIC, "kinds", "file", "--json"])
    params = {p["name"]: p for p in json.loads(res.stdout)["params"]}
    assert {"file", "dir", "cache", "fadvise"} <= set(params)
    assert not params["file"]["required"] and not params["dir"]["required"]
    assert "dir=" in json.loads(res.stdout)["manual"]


# The backend in-process ---------------------------------------------------------------------


def test_dir_is_declared_as_several_exports_before_start(directory: Path, tmp_path: Path) -> None:
    """What the orchestrator reads from the params alone (File.multi_export) is what the
    started backend serves: several exports (exports() lists them) or one (None)."""

    async def scenario() -> None:
        (tmp_path / "one.img").write_bytes(b"x" * 4096)
        for params, declared in (
            (FileParams(dir=str(directory)), "directory"),
            (FileParams(file=str(tmp_path / "one.img")), None),
        ):
            assert File.multi_export(params) == declared
            backend = File.create(params)
            await backend.start()
            assert (backend.exports() is not None) == (declared is not None)
            await backend.stop()

    asyncio.run(scenario())


def test_dir_backend_shares_flushes_and_closes_files(
    directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        params = FileParams(dir=str(directory), cache="default")
        backend = File.create(params)
        assert isinstance(backend, FileDirectory)
        await backend.start()
        a, b = backend.for_export("a.img"), backend.for_export("b.img")
        assert isinstance(a, DirectoryFile) and isinstance(b, DirectoryFile)
        assert backend.for_export("a.img") is a  # shared
        for name in REFUSED:
            assert backend.for_export(name) is None, name
        # A name that is not UTF-8 cannot be an NBD export name: not listed, no error.
        os.close(os.open(bytes(directory) + b"/\xff.img", os.O_CREAT | os.O_WRONLY))
        assert [name for name, _ in backend.exports()] == EXPORTS
        await a.open_connection()
        await a.pwrite(memoryview(b"z" * 512), 0, 0)
        synced: list[int] = []
        monkeypatch.setattr(os, "fdatasync", synced.append)
        await backend.flush(0)  # the node's flush: every open file
        monkeypatch.undo()
        assert sorted(synced) == sorted([a.fd, b.fd])
        # Replaced while a client uses it: the old file stays open until it leaves.
        (directory / "a.img").unlink()
        (directory / "a.img").write_bytes(b"n" * 4096)
        new = backend.for_export("a.img")
        assert new is not a and new is not None and a.fd >= 0 and a in backend.retired
        await a.close_connection()
        assert a.fd < 0 and a not in backend.retired
        # Replaced between a client's lookup and its start: that client is turned away.
        (directory / "b.img").unlink()
        (directory / "b.img").write_bytes(b"m" * 4096)
        assert backend.for_export("b.img") is not b and b.fd < 0
        with pytest.raises(OSError) as caught:
            await b.open_connection()
        assert caught.value.errno == errno.ESTALE
        await b.close_connection()  # as the session does after a failed open: harmless
        await backend.stop()
        assert backend.dir_fd < 0 and new.fd < 0

    asyncio.run(scenario())


def test_dir_keeps_few_idle_files_open_however_many_are_asked_about(
    directory: Path, start_node: Callable[..., Proc]
) -> None:
    # nbdinfo --list asks for every export's size (one INFO each): a big directory must not use
    # up the node's file descriptors, and every file still serves afterwards.
    names = [f"disk{i:02}.img" for i in range(3 * MAX_IDLE_FILES)]
    for i, name in enumerate(names):
        (directory / name).write_bytes(bytes([i]) * 4096)
    node = start_node("file", f"dir={directory}")
    assert set(names) <= set(listed(node))
    assert len([p for p in open_fds(node.pid) if p.startswith(str(directory))]) <= MAX_IDLE_FILES
    for i, name in enumerate(names):  # the first ones were closed: reopened when asked for
        h = nbd_connect(uri(node, name))
        assert h.pread(4096, 0) == bytes([i]) * 4096, name
        h.shutdown()


def test_dir_backend_reopens_a_file_closed_idle_unless_it_changed(directory: Path) -> None:
    async def scenario() -> None:
        backend = File.create(FileParams(dir=str(directory), cache="default"))
        assert isinstance(backend, FileDirectory)
        await backend.start()
        for i in range(MAX_IDLE_FILES + 2):
            (directory / f"x{i:02}").write_bytes(b"x" * 512)
        first = backend.for_export("a.img")
        assert isinstance(first, DirectoryFile)
        for i in range(MAX_IDLE_FILES + 2):  # a client asking about many files
            assert backend.for_export(f"x{i:02}") is not None
        assert first.fd < 0 and "a.img" not in backend.files  # closed while idle
        open_now = [f for f in backend.files.values() if f.fd >= 0]
        assert len(open_now) == MAX_IDLE_FILES
        await first.open_connection()  # the client that looked it up starts: reopened
        buf = bytearray(4)
        await first.pread(memoryview(buf), 0, 0)
        assert bytes(buf) == b"AAAA" and backend.files["a.img"] is first
        await first.close_connection()
        # Closed while idle, then replaced before its client starts: turned away.
        for i in range(MAX_IDLE_FILES + 2):
            backend.for_export(f"x{i:02}")
        b = backend.for_export("b.img")
        assert isinstance(b, DirectoryFile)
        for i in range(MAX_IDLE_FILES + 2):
            backend.for_export(f"x{i:02}")
        assert b.fd < 0
        # Kept elsewhere, so that the new file cannot reuse its inode number (identity is
        # st_dev and st_ino).
        os.link(directory / "b.img", directory.parent / "old-b.img")
        (directory / "b.img").unlink()
        (directory / "b.img").write_bytes(b"m" * 4096)
        with pytest.raises(OSError) as caught:
            await b.open_connection()
        assert caught.value.errno == errno.ESTALE and b.fd < 0
        await backend.stop()

    asyncio.run(scenario())
