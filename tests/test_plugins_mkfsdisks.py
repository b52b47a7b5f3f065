"""The plugins that make file systems with mkfs: `tmpdisk` (a fresh disk per connection),
checked with real clients (libnbd, nbdinfo, nbdcopy) and the e2fsprogs tools on what they read
back (e2fsck, blkid, debugfs), and beside nbdkit 1.32's plugins of the same names.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import nbd
import pytest
from conftest import NBDFABRIC, ROOT, Proc, capabilities, run, wait_for

MiB = 1024 * 1024
#: What nbdinfo says of a tmpdisk export that both agree on (nbdkit offers no cache).
AGREED = ("export-size", "is_read_only", "can_flush", "can_fua", "can_trim", "can_zero",
          "can_fast_zero", "can_multi_conn", "can_df")  # fmt: skip


# Helpers --------------------------------------------------------------------------------------


def uri_of(node: Proc, name: str = "") -> str:
    return f"nbd+unix:///{quote(name)}?socket={node.socket}"


def connect(node: Proc, name: str = "") -> nbd.NBD:
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(node.socket)
    return h


def read_disk(h: nbd.NBD) -> bytes:
    size, out = h.get_size(), bytearray()
    for pos in range(0, size, 4 * MiB):
        out += h.pread(min(4 * MiB, size - pos), pos)
    return bytes(out)


def write_disk(h: nbd.NBD, data: bytes) -> None:
    for pos in range(0, len(data), 4 * MiB):
        h.pwrite(data[pos : pos + 4 * MiB], pos)
    h.flush()


def save(h: nbd.NBD, path: Path) -> Path:
    path.write_bytes(read_disk(h))
    return path


def probe(path: Path) -> dict[str, str]:
    """blkid's low-level probe of an image: TYPE, LABEL, UUID, ..."""
    out = run(["blkid", "-p", "-o", "export", str(path)], check=False).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def fsck_clean(path: Path) -> None:
    res = run(["e2fsck", "-fn", str(path)], check=False)
    assert res.returncode == 0, f"e2fsck -fn {path}: {res.returncode}\n{res.stdout}{res.stderr}"


def debugfs(path: Path, request: str, write: bool = False) -> str:
    return run(["debugfs", *(["-w"] if write else []), "-R", request, str(path)]).stdout


def disk_fds(pid: int, directory: Path) -> list[str]:
    """What the node's open files in `directory` are (the disks, unlinked: "(deleted)")."""
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(f"{directory}/"):
            out.append(target)
    return out


def refused(node: Proc, name: str = "") -> bool:
    try:
        connect(node, name).shutdown()
    except nbd.Error:
        return True
    return False


@pytest.fixture
def tmpdir_env(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A TMPDIR of the test's own: the disks are made there."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    return directory, {"TMPDIR": str(directory)}


def node_exits(tmp_path: Path, kind: str, *args: str, env: dict[str, str] | None = None):
    """`nbdfabric node KIND ARGS` that must not start: its exit status and stderr."""
    res = subprocess.run(
        [*NBDFABRIC, "node", kind, *args, "--listen", f"unix:{tmp_path}/never.sock"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert "Traceback" not in res.stderr, res.stderr
    return res.returncode, res.stderr


# tmpdisk --------------------------------------------------------------------------------------


def test_tmpdisk_each_client_writes_its_own_fresh_file_system(
    start_node: Callable[..., Proc], tmpdir_env: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    _, env = tmpdir_env
    node = start_node("tmpdisk", "8M", "label=scratch", env=env)
    a, b = connect(node), connect(node, "any name")
    # A puts a file in its file system (debugfs on a copy, written back through A).
    mine = save(a, tmp_path / "a.img")
    assert probe(mine)["TYPE"] == "ext4" and probe(mine)["LABEL"] == "scratch"
    fsck_clean(mine)
    (tmp_path / "hello.txt").write_text("hello from a\n")
    debugfs(mine, f"write {tmp_path / 'hello.txt'} hello.txt", write=True)
    write_disk(a, mine.read_bytes())
    # B, connected all along, has a fresh file system of its own: no such file, another UUID.
    theirs = save(b, tmp_path / "b.img")
    fsck_clean(theirs)
    assert "hello.txt" not in debugfs(theirs, "ls /")
    assert probe(theirs)["LABEL"] == "scratch"
    assert probe(theirs)["UUID"] != probe(mine)["UUID"]
    # A reads its own file back, and its file system is still valid.
    again = save(a, tmp_path / "a2.img")
    fsck_clean(again)
    assert debugfs(again, "cat /hello.txt") == "hello from a\n"
    a.shutdown()
    b.shutdown()
    # A new connection of A's gets a fresh disk again.
    c = connect(node)
    assert "hello.txt" not in debugfs(save(c, tmp_path / "c.img"), "ls /")
    c.shutdown()


def test_tmpdisk_disk_is_gone_when_its_client_disconnects_or_is_killed(
    start_node: Callable[..., Proc], tmpdir_env: tuple[Path, dict[str, str]]
) -> None:
    directory, env = tmpdir_env
    node = start_node("tmpdisk", "4M", env=env)
    assert disk_fds(node.pid, directory) == []
    a, b = connect(node), connect(node)
    held = disk_fds(node.pid, directory)
    # Two disks, already unlinked (nothing to clean up after a crash), their folders gone.
    assert len(held) == 2 and all(t.endswith("(deleted)") for t in held), held
    assert list(directory.iterdir()) == []
    a.shutdown()
    wait_for(lambda: len(disk_fds(node.pid, directory)) == 1, what="A's disk to be closed")
    b.shutdown()
    wait_for(lambda: disk_fds(node.pid, directory) == [], what="B's disk to be closed")
    # A client killed with -9 mid-connection: its disk goes too.
    client = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import nbd, sys, time
        h = nbd.NBD()
        h.connect_unix({node.socket!r})
        h.pwrite(b"x" * 4096, 0)
        print("connected", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert client.stdout is not None and client.stdout.readline() == "connected\n"
    assert len(disk_fds(node.pid, directory)) == 1
    client.send_signal(signal.SIGKILL)
    client.wait()
    wait_for(lambda: disk_fds(node.pid, directory) == [], what="the killed client's disk to go")
    # INFO alone (nbdinfo --list) makes a disk for the connection, gone with it too.
    listed = run(["nbdinfo", "--list", "--json", node.uri]).stdout
    assert '"export-name": ""' in listed
    wait_for(lambda: disk_fds(node.pid, directory) == [], what="the listing's disks to go")
    # A node killed -9 while a client holds a disk leaves nothing behind in TMPDIR.
    held_client = connect(node)
    node.kill()
    del held_client
    assert list(directory.iterdir()) == []


def test_tmpdisk_matches_nbdkit(
    start_node: Callable[..., Proc],
    start_nbdkit: Callable[..., Proc],
    tmpdir_env: tuple[Path, dict[str, str]],
    tmp_path: Path,
) -> None:
    _, env = tmpdir_env
    ours = start_node("tmpdisk", "size=16M", "type=ext4", "label=LBL", env=env)
    theirs = start_nbdkit("tmpdisk", "size=16M", "type=ext4", "label=LBL", env=env)
    assert capabilities(ours.uri, AGREED) == capabilities(theirs.uri, AGREED)
    images = {}
    for who, node in (("ours", ours), ("theirs", theirs)):
        h = connect(node, "some-name")
        images[who] = save(h, tmp_path / f"{who}.img")
        h.shutdown()
        fsck_clean(images[who])
    fs = {who: probe(path) for who, path in images.items()}
    for key in ("TYPE", "LABEL", "USAGE"):
        assert fs["ours"][key] == fs["theirs"][key], (key, fs)
    assert fs["ours"]["TYPE"] == "ext4" and fs["ours"]["LABEL"] == "LBL"
    # Both list the default export only (and take any name: "some-name" above).
    for node in (ours, theirs):
        out = run(["nbdinfo", "--list", "--json", node.uri]).stdout
        assert out.count('"export-name"') == 1 and '"export-name": ""' in out


COMMAND = 'printf "%s" "$foo-$size-$type-${label-unset}-$(basename "$disk")" > "$disk"'


def test_tmpdisk_command_gets_the_variables_nbdkit_gives(
    start_node: Callable[..., Proc],
    start_nbdkit: Callable[..., Proc],
    tmpdir_env: tuple[Path, dict[str, str]],
) -> None:
    _, env = tmpdir_env
    args = ("size=0", "foo=bar baz", "type=xfs", f"command={COMMAND}")
    ours = start_node("tmpdisk", *args, env=env)
    theirs = start_nbdkit("tmpdisk", *args, env=env)
    got = {}
    for who, node in (("ours", ours), ("theirs", theirs)):
        h = connect(node)
        got[who] = read_disk(h)  # the size is what the command made
        h.shutdown()
    assert got["ours"] == got["theirs"] == b"bar baz-0-xfs-unset-disk"


def test_tmpdisk_a_failing_command_refuses_the_client_and_the_node_serves_on(
    start_node: Callable[..., Proc],
    start_nbdkit: Callable[..., Proc],
    tmpdir_env: tuple[Path, dict[str, str]],
    tmp_path: Path,
) -> None:
    directory, env = tmpdir_env
    flag = tmp_path / "fail"
    flag.touch()
    command = f'test ! -e {flag} && truncate -s $size "$disk"'
    node = start_node("tmpdisk", "1M", f"command={command}", env=env)
    (tmp_path / "theirs").mkdir()
    theirs = start_nbdkit("tmpdisk", "1M", f"command={command}",
                          env={"TMPDIR": str(tmp_path / "theirs")})  # fmt: skip
    for who in (node, theirs):
        with pytest.raises(nbd.Error) as exc:
            connect(who)
        assert exc.value.errno == "ENOENT"  # NBD_REP_ERR_UNKNOWN, as libnbd tells it
    assert "command= exited with status 1" in node.stderr()
    assert list(directory.iterdir()) == []
    flag.unlink()
    h = connect(node)
    assert h.get_size() == MiB
    h.shutdown()
    # A command that makes nothing, or something not a disk.
    for command, said in (("true", "made nothing at $disk"),
                          ('mkdir "$disk"', "$disk: Is a directory")):  # fmt: skip
        other = start_node("tmpdisk", "1M", f"command={command}", env=env)
        assert refused(other)
        assert said in other.stderr() and "[Errno" not in other.stderr()
        assert list(directory.iterdir()) == []


def test_tmpdisk_client_gone_while_its_disk_is_made(
    start_node: Callable[..., Proc], tmpdir_env: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """A client that gives up (here: --handshake-limit) while its command runs: the command's
    processes are killed and its folder removed; the node serves on."""
    directory, env = tmpdir_env
    pidfile = tmp_path / "started"
    command = f'echo $$ > {pidfile}; sleep 300; truncate -s $size "$disk"'
    node = start_node("tmpdisk", "1M", f"command={command}", extra=("--handshake-limit", "1"),
                      env=env)  # fmt: skip
    assert refused(node)
    group = int(pidfile.read_text())  # the shell's pid: its process group's id
    wait_for(lambda: not group_alive(group), what="the command to be killed")
    wait_for(lambda: list(directory.iterdir()) == [], what="its folder to be removed")
    assert node.proc.poll() is None


def group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` is alive (zombies are not)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in "ZX":
            return True
    return False


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["1M", "type=nosuchfs"], "there is no mkfs.nosuchfs"),
        (["1M", "type=ext4;rm"], "'type'"),
        (["size=0"], "'size'"),
        (["1M", "lable=x"], "unknown parameter 'lable', did you mean 'label'?"),
        (["1M", "command=true", "disk=/x"], "'disk' cannot be set"),
        (["1M", "command=true", "foo-bar=1"], "shell variable name"),
        (["1M", "type=minix", "label=x"], "has no label"),
        ([], "'size' is required"),
    ],
)
def test_tmpdisk_bad_params_exit_1_saying_why(tmp_path: Path, args: list[str], said: str) -> None:
    status, stderr = node_exits(tmp_path, "tmpdisk", *args)
    assert status == 1 and said in stderr, stderr


def test_tmpdisk_a_missing_tmpdir_exits_1(tmp_path: Path) -> None:
    status, stderr = node_exits(tmp_path, "tmpdisk", "1M", env={"TMPDIR": str(tmp_path / "no")})
    assert status == 1 and "TMPDIR" in stderr and "not a directory" in stderr, stderr


def test_tmpdisk_in_a_topology_is_named_bare_or_by_export() -> None:
    from orchestrator.topology import TopologyError, load_text

    top = load_text(
        """
nodes:
  scratch: {kind: tmpdisk, params: {size: 1G, label: s}}
  a: {kind: cow, upstream: scratch}
  b: {kind: readahead, upstream: scratch/anything}
exports:
  fresh: {node: scratch, listen: ["unix:/run/t.sock"]}
""",
        "f.yaml",
    )
    assert top.nodes["scratch"].multi_export == "on-demand"
    assert top.exports["fresh"].served_name == ""  # no --export-name: every name is served
    assert top.nodes["a"].upstreams == ("scratch",)
    assert top.nodes["b"].upstreams == ("scratch/anything",)
    with pytest.raises(TopologyError, match="unknown parameter 'lable'"):
        load_text("nodes:\n  t: {kind: tmpdisk, params: {size: 1G, lable: x}}\n", "f.yaml")
