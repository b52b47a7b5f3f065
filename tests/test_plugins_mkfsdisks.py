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


def test_tmpdisk_and_ondemand_in_a_topology_are_named_bare_or_by_export() -> None:
    from orchestrator.topology import TopologyError, load_text

    top = load_text(
        """
nodes:
  scratch: {kind: tmpdisk, params: {size: 1G, label: s}}
  kept: {kind: ondemand, params: {size: 1G, dir: /srv/exports}}
  a: {kind: cow, upstream: scratch}
  b: {kind: readahead, upstream: scratch/anything}
  c: {kind: cow, upstream: kept/vm1}
  d: {kind: cow, upstream: kept}
exports:
  fresh: {node: scratch, listen: ["unix:/run/t.sock"]}
""",
        "f.yaml",
    )
    assert top.nodes["scratch"].multi_export == "on-demand"
    assert top.exports["fresh"].served_name == ""  # no --export-name: every name is served
    assert top.nodes["a"].upstreams == ("scratch",)
    assert top.nodes["b"].upstreams == ("scratch/anything",)
    assert top.nodes["kept"].multi_export == "on-demand"
    assert top.nodes["c"].upstreams == ("kept/vm1",) and top.nodes["d"].upstreams == ("kept",)
    with pytest.raises(TopologyError, match="unknown parameter 'lable'"):
        load_text("nodes:\n  t: {kind: tmpdisk, params: {size: 1G, lable: x}}\n", "f.yaml")


# ondemand -------------------------------------------------------------------------------------


def listed_names(uri: str) -> list[str]:
    """NBD_OPT_LIST's names as they are sent (nbdinfo shows canonical names instead)."""
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri)
    names: list[str] = []
    h.opt_list(lambda name, description: names.append(name) or 0)
    h.opt_abort()
    return sorted(names)


def put_file(h: nbd.NBD, tmp_path: Path, name: str, text: str) -> None:
    """Write /NAME holding `text` into the ext file system of export `h` (through `h`)."""
    image = save(h, tmp_path / "edit.img")
    (tmp_path / "content").write_text(text)
    debugfs(image, f"write {tmp_path / 'content'} {name}", write=True)
    write_disk(h, image.read_bytes())


@pytest.fixture
def exports_dir(tmp_path: Path) -> Path:
    d = tmp_path / "exports"
    d.mkdir()
    return d


def test_ondemand_makes_each_export_once_and_keeps_it(
    start_node: Callable[..., Proc], exports_dir: Path, tmp_path: Path
) -> None:
    node = start_node("ondemand", "4M", f"dir={exports_dir}", "label=od")
    assert listed_names(node.uri) == [""]  # the default export, always there to be made
    h = connect(node, "alpha")
    put_file(h, tmp_path, "note.txt", "kept\n")
    h.shutdown()
    # Its file, formatted, holds what the client wrote, and is listed.
    disk = exports_dir / "alpha"
    assert disk.stat().st_size == 4 * MiB
    fsck_clean(disk)
    assert probe(disk)["TYPE"] == "ext4" and probe(disk)["LABEL"] == "od"
    assert debugfs(disk, "cat /note.txt") == "kept\n"
    assert listed_names(node.uri) == ["", "alpha"]
    # Another connection to it finds it as it was; another name is another file system.
    h = connect(node, "alpha")
    assert debugfs(save(h, tmp_path / "again.img"), "cat /note.txt") == "kept\n"
    h.shutdown()
    h = connect(node, "beta")
    assert "note.txt" not in debugfs(save(h, tmp_path / "beta.img"), "ls /")
    h.shutdown()
    # "" is the file `default`, listed as "" (nbdinfo --list shows its canonical name).
    h = connect(node, "")
    h.shutdown()
    assert (exports_dir / "default").exists()
    assert listed_names(node.uri) == ["", "alpha", "beta"]
    out = run(["nbdinfo", "--list", "--json", node.uri]).stdout
    assert '"export-name": "default"' in out and '"export-name": "alpha"' in out
    # After a restart of the node, the same disks.
    node.stop()
    node = start_node("ondemand", "4M", f"dir={exports_dir}")
    assert listed_names(node.uri) == ["", "alpha", "beta"]
    h = connect(node, "alpha")
    assert debugfs(save(h, tmp_path / "restarted.img"), "cat /note.txt") == "kept\n"
    h.shutdown()
    assert sorted(p.name for p in exports_dir.iterdir()) == ["alpha", "beta", "default"]


def test_ondemand_one_client_at_a_time_per_export(
    start_node: Callable[..., Proc], start_nbdkit: Callable[..., Proc], exports_dir: Path
) -> None:
    node = start_node("ondemand", "1M", f"dir={exports_dir}", 'command=truncate -s $size "$disk"')
    theirs = start_nbdkit("ondemand", f"dir={exports_dir}", "1M",
                          "command=truncate -s $size \"$disk\"")  # fmt: skip
    a = connect(node, "shared")
    for who in (node, theirs):  # the lock holds against this node's clients and nbdkit's
        with pytest.raises(nbd.Error) as exc:
            connect(who, "shared")
        assert exc.value.errno == "ENOENT"
    assert "filesystem is locked by another client" in node.stderr()
    other = connect(node, "other")  # other exports are free
    # INFO too is refused while it is held (as nbdkit), and the list still shows it.
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.set_export_name("shared")
    h.connect_unix(node.socket)
    with pytest.raises(nbd.Error):
        h.opt_info()
    h.opt_abort()
    assert "shared" in listed_names(node.uri)
    a.shutdown()
    wait_for(lambda: not refused(node, "shared"), what="the export to be free again")
    # nbdkit's client holds it: ours is refused (the same OFD lock).
    b = connect(theirs, "shared")
    assert refused(node, "shared")
    b.shutdown()
    wait_for(lambda: not refused(node, "shared"), what="nbdkit's client to let it go")
    other.shutdown()


def test_ondemand_wait_true_waits_for_the_export(
    start_node: Callable[..., Proc], exports_dir: Path, tmp_path: Path
) -> None:
    import threading

    node = start_node("ondemand", "4M", f"dir={exports_dir}", "wait=true")
    a = connect(node, "turns")
    got: list[object] = []

    def second() -> None:
        try:
            h = connect(node, "turns")
            got.append(save(h, tmp_path / "second.img"))
            h.shutdown()
        except nbd.Error as exc:
            got.append(exc)

    waiter = threading.Thread(target=second)
    waiter.start()
    waiter.join(0.5)  # (not a timing check: it cannot have the export while A does)
    assert not got
    put_file(a, tmp_path, "first.txt", "a was here\n")
    a.shutdown()
    waiter.join(30)
    (image,) = got
    assert isinstance(image, Path), image
    assert debugfs(image, "cat /first.txt") == "a was here\n"  # it got it after A


BAD_NAMES = [".", "..", ".hidden", "a.b", "x:y", "a/b", "/abs", "n" * 256, "é" * 128]
GOOD_NAMES = ["-x", "a b", "é" * 127, "n" * 255, "tab\there", "$x", "'q", "x;y"]


def test_ondemand_refuses_the_names_nbdkit_refuses(
    start_node: Callable[..., Proc], start_nbdkit: Callable[..., Proc], tmp_path: Path
) -> None:
    results = {}
    for who in ("ours", "theirs"):
        folder = tmp_path / who
        folder.mkdir()
        command = 'command=truncate -s $size "$disk"'
        if who == "ours":
            node = start_node("ondemand", "64K", f"dir={folder}", command)
        else:
            node = start_nbdkit("ondemand", f"dir={folder}", "64K", command)
        results[who] = {name: refused(node, name) for name in BAD_NAMES + GOOD_NAMES}
        made = sorted(p.name for p in folder.iterdir())
        assert made == sorted(GOOD_NAMES), (who, made)
    assert results["ours"] == results["theirs"]
    assert all(results["ours"][n] for n in BAD_NAMES)
    assert not any(results["ours"][n] for n in GOOD_NAMES)


def test_ondemand_matches_nbdkit(
    start_node: Callable[..., Proc], start_nbdkit: Callable[..., Proc], tmp_path: Path
) -> None:
    """The same requests to each over a directory of its own: the same exports made (ext4,
    labelled), listed alike, with the same capabilities."""
    images, lists, caps = {}, {}, {}
    for who in ("ours", "theirs"):
        folder = tmp_path / who
        folder.mkdir()
        (folder / "given.img").write_bytes(b"\1" * 8192)  # not a valid export name: not listed
        (folder / "given").write_bytes(b"\2" * 8192)  # one there already
        args = ("8M", f"dir={folder}", "type=ext4", "label=vol")
        node = start_node("ondemand", *args) if who == "ours" else start_nbdkit("ondemand", *args)
        for name in ("x", "y", ""):
            connect(node, name).shutdown()
        caps[who] = capabilities(uri_of(node, "x"), AGREED)
        lists[who] = listed_names(node.uri)
        given = connect(node, "given")
        assert read_disk(given) == b"\2" * 8192  # served as it is
        given.shutdown()
        images[who] = {name: probe(folder / name) for name in ("x", "y", "default")}
    assert caps["ours"] == caps["theirs"]
    assert lists["ours"] == lists["theirs"] == ["", "given", "x", "y"]
    for name in ("x", "y", "default"):
        for key in ("TYPE", "LABEL"):
            assert images["ours"][name][key] == images["theirs"][name][key] == {
                "TYPE": "ext4", "LABEL": "vol"}[key]  # fmt: skip


def test_ondemand_command_makes_new_disks_once_and_whole(
    start_node: Callable[..., Proc], exports_dir: Path, tmp_path: Path
) -> None:
    log = tmp_path / "made.log"
    command = (f'echo "$(basename "$disk") $size $flavour" >> {log}; sleep 0.3; '
               'truncate -s 12345 "$disk"')  # fmt: skip
    node = start_node("ondemand", "1M", f"dir={exports_dir}", "wait=true", "flavour=plain",
                      f"command={command}")  # fmt: skip
    # Two clients ask for a new name at once: it is made once, both get it in turn.
    import threading

    sizes: list[object] = []

    def use() -> None:
        try:
            h = connect(node, "twice")
            sizes.append(h.get_size())
            h.shutdown()
        except nbd.Error as exc:
            sizes.append(exc)

    threads = [threading.Thread(target=use) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sizes == [12345, 12345]
    assert log.read_text() == "twice 1048576 plain\n"
    assert sorted(p.name for p in exports_dir.iterdir()) == ["twice"]  # no folder left


def test_ondemand_a_failed_or_interrupted_making_leaves_no_export(
    start_node: Callable[..., Proc], exports_dir: Path, tmp_path: Path
) -> None:
    flag = tmp_path / "fail"
    flag.touch()
    command = f'truncate -s $size "$disk"; test ! -e {flag}'  # makes a file, then fails
    node = start_node("ondemand", "1M", f"dir={exports_dir}", f"command={command}")
    assert refused(node, "broken")
    assert list(exports_dir.iterdir()) == []  # not even the half-made file
    assert "command= exited with status 1" in node.stderr()
    flag.unlink()
    assert not refused(node, "broken")
    node.stop()
    # A node killed -9 while it makes a disk: the half-made one is never served.
    started = tmp_path / "started"
    command = f'truncate -s $size "$disk"; echo $$ > {started}; sleep 300'
    node = start_node("ondemand", "1M", f"dir={exports_dir}", f"command={command}")
    client = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import nbd
        h = nbd.NBD()
        h.set_export_name("cut")
        h.connect_unix({node.socket!r})
    """)], stderr=subprocess.DEVNULL)  # fmt: skip
    wait_for(lambda: started.exists() and started.read_text().strip(), what="the command")
    node.kill()
    client.wait(30)
    os.killpg(int(started.read_text()), signal.SIGKILL)  # it outlives a node killed -9
    node = start_node("ondemand", "1M", f"dir={exports_dir}", 'command=truncate -s 4096 "$disk"')
    assert listed_names(node.uri) == ["", "broken"]
    h = connect(node, "cut")
    assert h.get_size() == 4096  # made anew
    h.shutdown()


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["1M", "dir={tmp}/nowhere"], "nowhere: No such file or directory"),
        (["1M", "dir={tmp}/file"], "file: Not a directory"),
        (["1M"], "'dir' is required"),
        (["size=0", "dir={tmp}"], "'size'"),
        (["1M", "dir={tmp}", "type=nosuchfs"], "there is no mkfs.nosuchfs"),
        (["1M", "dir={tmp}", "wait=maybe"], "'wait'"),
        (["1M", "dir={tmp}", "colour=red"], "unknown parameter 'colour'"),
    ],
)
def test_ondemand_bad_params_exit_1_saying_why(tmp_path: Path, args: list[str], said: str) -> None:
    (tmp_path / "file").touch()
    words = [a.format(tmp=tmp_path) for a in args]
    status, stderr = node_exits(tmp_path, "ondemand", *words)
    assert status == 1 and said in stderr, stderr


# linuxdisk ------------------------------------------------------------------------------------

LINUX_FS_GUID = "0fc63daf-8483-4772-8e79-3d69d8477de4"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A directory of what a root file system holds: text, binary, empty and sparse files,
    a subdirectory, a symbolic and a hard link, odd names."""
    root = tmp_path / "tree"
    (root / "etc" / "deep").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("linuxdisk-test\n")
    (root / "etc" / "deep" / "random.bin").write_bytes(os.urandom(300_000))
    (root / "empty").touch()
    with (root / "sparse").open("wb") as f:
        f.truncate(2 * MiB)
        f.seek(MiB)
        f.write(b"middle")
    (root / "with space é").write_text("odd name\n")
    (root / "hostname-link").symlink_to("etc/hostname")
    os.link(root / "etc" / "hostname", root / "hardlink")
    return root


def gpt(image: bytes) -> dict[str, object]:
    """The GPT of a disk image: its header's fields and its first partition's."""
    import struct
    import uuid
    import zlib

    header = image[512 : 512 + 92]
    (sig, _, size, crc, _, _, backup, first, last, disk_guid, at, count, entry_size,
     array_crc) = struct.unpack("<8sIIIIQQQQ16sQIII", header)  # fmt: skip
    raw = bytearray(image[512 : 512 + size])
    raw[16:20] = bytes(4)
    array = image[at * 512 : at * 512 + count * entry_size]
    ptype, _, start, end, attrs, name = struct.unpack("<16s16sQQQ72s", array[:128])
    return {
        "signature": sig,
        "header_crc_ok": zlib.crc32(bytes(raw)) == crc,
        "array_crc_ok": zlib.crc32(array) == array_crc,
        "backup_lba": backup,
        "first_usable": first,
        "last_usable": last,
        "entries": count,
        "type": str(uuid.UUID(bytes_le=ptype)),
        "start": start,
        "end": end,
        "attributes": attrs,
        "name": name.decode("utf-16-le").rstrip("\0"),
        "disk_guid": str(uuid.UUID(bytes_le=disk_guid)),
        "protective_mbr": image[450] == 0xEE and image[510:512] == b"\x55\xaa",
        "backup_header": image[backup * 512 : backup * 512 + 8] == b"EFI PART",
        "disk_size": len(image),
    }


def partition_of(image: Path, out: Path) -> Path:
    data = image.read_bytes()
    g = gpt(data)
    out.write_bytes(data[int(g["start"]) * 512 : (int(g["end"]) + 1) * 512])  # type: ignore[call-overload]
    return out


def copy_of(node: Proc, path: Path) -> Path:
    run(["nbdcopy", node.uri, str(path)])
    return path


def test_linuxdisk_serves_the_directory_as_an_ext_file_system_in_a_gpt_partition(
    start_node: Callable[..., Proc], tree: Path, tmp_path: Path
) -> None:
    node = start_node("linuxdisk", str(tree), "type=ext4", "label=ROOTFS")
    disk = copy_of(node, tmp_path / "disk.img")
    g = gpt(disk.read_bytes())
    assert g["signature"] == b"EFI PART" and g["header_crc_ok"] and g["array_crc_ok"], g
    assert g["protective_mbr"] and g["backup_header"] and g["entries"] == 128
    assert g["type"] == LINUX_FS_GUID and g["start"] == 2048 and g["attributes"] == 4
    fs = partition_of(disk, tmp_path / "fs.img")
    fsck_clean(fs)
    assert probe(fs)["TYPE"] == "ext4" and probe(fs)["LABEL"] == "ROOTFS"
    assert debugfs(fs, "cat /etc/hostname") == "linuxdisk-test\n"
    (tmp_path / "random.out").unlink(missing_ok=True)
    debugfs(fs, f"dump /etc/deep/random.bin {tmp_path / 'random.out'}")
    assert (tmp_path / "random.out").read_bytes() == (tree / "etc/deep/random.bin").read_bytes()
    assert debugfs(fs, "cat /empty") == ""
    debugfs(fs, f"dump /sparse {tmp_path / 'sparse.out'}")
    assert (tmp_path / "sparse.out").read_bytes() == (tree / "sparse").read_bytes()
    assert debugfs(fs, 'cat "/with space é"') == "odd name\n"
    assert 'Fast link dest: "etc/hostname"' in debugfs(fs, "stat /hostname-link")
    assert debugfs(fs, "stat /hardlink").split("Links: ")[1].split()[0] == "2"


def test_linuxdisk_is_read_only_and_shared(
    start_node: Callable[..., Proc], tree: Path, tmp_path: Path
) -> None:
    node = start_node("linuxdisk", f"dir={tree}")
    caps = capabilities(node.uri)
    assert caps["is_read_only"] and caps["can_multi_conn"] and not caps["can_trim"], caps
    h = connect(node)
    with pytest.raises(nbd.Error) as exc:
        h.pwrite(b"x" * 512, 0)
    assert exc.value.errno == "EPERM"
    h.shutdown()
    # Two clients read the same disk.
    assert (
        copy_of(node, tmp_path / "a.img").read_bytes()
        == copy_of(node, tmp_path / "b.img").read_bytes()
    )
    # A partition node over it serves the bare file system (ext2 by default).
    bare = start_node("partition", "partition=1", upstreams=[node.uri])
    fs = copy_of(bare, tmp_path / "bare.img")
    fsck_clean(fs)
    assert probe(fs)["TYPE"] == "ext2" and "LABEL" not in probe(fs)


def test_linuxdisk_sizes(
    start_node: Callable[..., Proc], tree: Path, tmp_path: Path, start_nbdkit: Callable[..., Proc]
) -> None:
    # SIZE: the file system's, rounded up to sectors; the disk has 1 MiB + 33 sectors more.
    node = start_node("linuxdisk", str(tree), "size=10000000")
    theirs = start_nbdkit("linuxdisk", str(tree), "size=10000000")
    want = 10000384 + MiB + 33 * 512
    assert capabilities(node.uri)["export-size"] == capabilities(theirs.uri)["export-size"] == want
    # +SIZE: at least that much free for users after the files.
    node = start_node("linuxdisk", str(tree), "size=+64M", "type=ext3")
    fs = partition_of(copy_of(node, tmp_path / "plus.img"), tmp_path / "plus.fs")
    head = run(["dumpe2fs", "-h", str(fs)]).stdout
    fields = dict(line.split(":", 1) for line in head.splitlines() if ":" in line)
    free = int(fields["Free blocks"]) - int(fields["Reserved block count"])
    assert free * int(fields["Block size"]) >= 64 * MiB
    assert "has_journal" in fields["Filesystem features"]
    # No size: about just enough (and the files are all there).
    node = start_node("linuxdisk", str(tree))
    fs = partition_of(copy_of(node, tmp_path / "fit.img"), tmp_path / "fit.fs")
    fsck_clean(fs)
    assert fs.stat().st_size < 8 * MiB
    assert debugfs(fs, "cat /etc/hostname") == "linuxdisk-test\n"


def test_linuxdisk_matches_nbdkit(
    start_node: Callable[..., Proc], start_nbdkit: Callable[..., Proc], tree: Path, tmp_path: Path
) -> None:
    args = (str(tree), "size=16M", "type=ext4", "label=same")
    ours, theirs = start_node("linuxdisk", *args), start_nbdkit("linuxdisk", *args)
    agreed = ("export-size", "is_read_only", "can_flush", "can_fua", "can_trim", "can_zero",
              "can_fast_zero", "can_cache", "can_multi_conn", "can_df")  # fmt: skip
    assert capabilities(ours.uri, agreed) == capabilities(theirs.uri, agreed)
    tables, files = {}, {}
    for who, node in (("ours", ours), ("theirs", theirs)):
        disk = copy_of(node, tmp_path / f"{who}.img")
        tables[who] = gpt(disk.read_bytes())
        fs = partition_of(disk, tmp_path / f"{who}.fs")
        fsck_clean(fs)
        odd = debugfs(fs, 'cat "/with space é"')
        files[who] = (probe(fs)["TYPE"], probe(fs)["LABEL"], debugfs(fs, "cat /etc/hostname"), odd)
    assert files["ours"] == files["theirs"] == ("ext4", "same", "linuxdisk-test\n", "odd name\n")
    layout = ("first_usable", "last_usable", "entries", "start", "end", "attributes", "name",
              "backup_lba", "disk_size", "header_crc_ok", "array_crc_ok")  # fmt: skip
    assert {k: tables["ours"][k] for k in layout} == {k: tables["theirs"][k] for k in layout}
    # nbdkit 1.32 writes the type GUID's text as its bytes; ours is the Linux data type.
    assert tables["ours"]["type"] == LINUX_FS_GUID != tables["theirs"]["type"]
    # ... and an all-zero disk GUID; ours is random.
    zero = "00000000-0000-0000-0000-000000000000"
    assert tables["theirs"]["disk_guid"] == zero != tables["ours"]["disk_guid"]


def test_linuxdisk_leaves_nothing_in_tmpdir(
    start_node: Callable[..., Proc], tree: Path, tmpdir_env: tuple[Path, dict[str, str]]
) -> None:
    directory, env = tmpdir_env
    node = start_node("linuxdisk", str(tree), env=env)
    assert list(directory.iterdir()) == []
    held = disk_fds(node.pid, directory)
    assert len(held) == 1 and held[0].endswith("(deleted)"), held
    node.kill()
    assert list(directory.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["{tmp}/nowhere"], "nowhere: No such file or directory"),
        (["{tmp}/file"], "file: Not a directory"),
        ([], "'dir' is required"),
        (["{tree}", "type=ext5"], "'type'"),
        (["{tree}", "size=0"], "'size'"),
        (["{tree}", "size=+x"], "'size'"),
        (["{tree}", "size=100K"], "Could not allocate"),
    ],
)
def test_linuxdisk_bad_params_exit_1_saying_why(
    tmp_path: Path, tree: Path, args: list[str], said: str
) -> None:
    (tmp_path / "file").touch()
    words = [a.format(tmp=tmp_path, tree=tree) for a in args]
    status, stderr = node_exits(tmp_path, "linuxdisk", *words)
    assert status == 1 and said in stderr, stderr


def test_orchestrator_exports_an_ondemand_node_and_a_filter_over_one_of_its_exports(
    tmp_path: Path,
) -> None:
    """`up` serves an ondemand node on its export's addresses (every name, made on first use;
    the URIs name none, with a note) and a cow over `kept/vm1`, which that node makes."""
    from test_orchestrator import Fabric, assert_all_gone

    (tmp_path / "exports").mkdir()
    fab = Fabric(
        tmp_path,
        "name: od\nnodes:\n"
        '  kept: {kind: ondemand, params: {size: 2M, dir: "${SOCKDIR}/exports",'
        ' command: "truncate -s $size \\"$disk\\""}}\n'
        "  vm1: {kind: cow, upstream: kept/vm1}\n"
        'exports:\n  all: {node: kept, listen: ["unix:${SOCKDIR}/all.sock"]}\n'
        '  one: {node: vm1, listen: ["unix:${SOCKDIR}/one.sock"]}\n',
    )
    try:
        out = fab.up()
        note = "  (an export made for each name asked for, nbdinfo --list)"
        assert f"  all: nbd+unix:///?socket={tmp_path}/all.sock{note}\n" in out, out
        assert fab.status()["kept"]["exports"] == "on-demand"
        assert (tmp_path / "exports" / "vm1").stat().st_size == 2 * MiB  # made for the cow
        h = nbd.NBD()
        h.connect_uri(fab.uri("one"))
        h.pwrite(b"overlay!" * 512, 0)
        assert h.pread(4096, 0) == b"overlay!" * 512
        h.shutdown()
        assert (tmp_path / "exports" / "vm1").read_bytes() == bytes(2 * MiB)  # the cow's own
        h = nbd.NBD()
        h.set_export_name("fresh")
        h.connect_unix(str(tmp_path / "all.sock"))
        assert h.get_size() == 2 * MiB
        h.shutdown()
        assert listed_names(f"nbd+unix:///?socket={tmp_path}/all.sock") == ["", "fresh", "vm1"]
        pids = set(fab.pids)
    finally:
        fab.cli("down", check=False)
    assert_all_gone(tmp_path, pids)
