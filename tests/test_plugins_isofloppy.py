"""The plugins that make a read-only disk image from directories at start: `iso` (an ISO 9660
CD-ROM by xorriso) and `floppy` (a FAT32 file system in an MBR partition), checked with real
clients (libnbd, nbdinfo, nbdcopy), the tools that read such images back (xorriso, mtools,
blkid), and beside nbdkit 1.32's plugins of the same names.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import nbd
import pytest
from conftest import NBDFABRIC, ROOT, Proc, capabilities, run

MiB = 1024 * 1024
#: What nbdinfo says of both read-only exports (nbdkit's too).
AGREED = ("is_read_only", "can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
          "can_cache", "can_multi_conn", "can_df", "is_rotational")  # fmt: skip


# Helpers --------------------------------------------------------------------------------------


def copy_of(node: Proc, path: Path) -> Path:
    run(["nbdcopy", node.uri, str(path)])
    return path


def node_exits(tmp_path: Path, kind: str, *args: str) -> tuple[int, str]:
    """`nbdfabric node KIND ARGS` that must not start: its exit status and stderr."""
    res = subprocess.run(
        [*NBDFABRIC, "node", kind, *args, "--listen", f"unix:{tmp_path}/never.sock"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "Traceback" not in res.stderr, res.stderr
    return res.returncode, res.stderr


def files_in(root: Path) -> dict[str, bytes]:
    """Every regular file under `root`, by its path from there."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def write_refused(node: Proc) -> None:
    h = nbd.NBD()
    h.connect_uri(node.uri)
    assert h.is_read_only()
    with pytest.raises(nbd.Error) as exc:
        h.pwrite(b"x" * 512, 0)
    assert exc.value.errno == "EPERM"
    # Still serving after the refusal.
    assert len(h.pread(512, 0)) == 512
    h.shutdown()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A directory: text, binary and empty files, a subdirectory, a long name."""
    root = tmp_path / "tree"
    (root / "etc" / "deep").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("isofloppy-test\n")
    (root / "etc" / "deep" / "random.bin").write_bytes(os.urandom(300_000))
    (root / "empty.txt").touch()
    (root / "a rather long file name.text").write_text("long name\n")
    return root


@pytest.fixture
def more(tmp_path: Path) -> Path:
    """A second directory, merged with the first into one ISO."""
    root = tmp_path / "more"
    (root / "extra").mkdir(parents=True)
    (root / "extra" / "notes.txt").write_text("from the second directory\n")
    return root


# iso ------------------------------------------------------------------------------------------


def extract_iso(image: Path, out: Path) -> dict[str, bytes]:
    run(["xorriso", "-indev", str(image), "-osirrox", "on", "-extract", "/", str(out)])
    return files_in(out)


def volume_id(image: Path) -> str:
    res = run(["xorriso", "-indev", str(image), "-pvd_info"])
    said = res.stdout + res.stderr
    line = next(x for x in said.splitlines() if x.startswith("Volume Id"))
    return line.split(":", 1)[1].strip()


def test_iso_serves_the_merged_directories_as_an_iso(
    start_node: Callable[..., Proc], tree: Path, more: Path, tmp_path: Path
) -> None:
    node = start_node("iso", str(tree), f"dir={more}", "params=-J -r -V 'My Disk'")
    image = copy_of(node, tmp_path / "cd.iso")
    assert run(["blkid", "-p", "-o", "value", "-s", "TYPE", str(image)]).stdout.strip() == "iso9660"
    assert volume_id(image) == "My Disk"
    got = extract_iso(image, tmp_path / "out")
    assert got == files_in(tree) | files_in(more)
    assert got["a rather long file name.text"] == b"long name\n"  # Rock Ridge: names kept
    write_refused(node)
    status = capabilities(node.uri, ("export-size",))
    assert status["export-size"] == image.stat().st_size


def test_iso_without_extensions_cuts_names_and_leaves_nothing_in_tmpdir(
    start_node: Callable[..., Proc], tree: Path, tmp_path: Path
) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    node = start_node("iso", f"dir={tree}", env={"TMPDIR": str(tmp)})
    assert list(tmp.iterdir()) == []
    held = [os.readlink(f) for f in Path(f"/proc/{node.pid}/fd").iterdir()]
    mine = [t for t in held if t.startswith(f"{tmp}/")]
    assert len(mine) == 1 and mine[0].endswith("(deleted)"), held  # open, already unlinked
    image = copy_of(node, tmp_path / "plain.iso")
    res = run(["xorriso", "-indev", str(image), "-ls", "/"])
    # Plain ISO 9660 (no -r, no -J): xorriso reads the 8.3 names, the long one cut.
    assert "HOSTNAME" not in res.stdout and "'ETC'" in res.stdout.upper(), res.stdout
    node.kill()
    assert list(tmp.iterdir()) == []


def test_iso_matches_nbdkit(
    start_node: Callable[..., Proc],
    start_nbdkit: Callable[..., Proc],
    tree: Path,
    more: Path,
    tmp_path: Path,
) -> None:
    args = (str(tree), f"dir={more}", "params=-J -r -V SAME")
    ours, theirs = start_node("iso", *args), start_nbdkit("iso", *args)
    keys = ("export-size", *AGREED)
    assert capabilities(ours.uri, keys) == capabilities(theirs.uri, keys)
    got = {}
    for who, node in (("ours", ours), ("theirs", theirs)):
        image = copy_of(node, tmp_path / f"{who}.iso")
        got[who] = (volume_id(image), extract_iso(image, tmp_path / f"{who}-out"))
    assert got["ours"] == got["theirs"]
    assert got["ours"][0] == "SAME" and got["ours"][1] == files_in(tree) | files_in(more)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        ([], "'dir' is required"),
        (["{tmp}/nowhere"], "dir={tmp}/nowhere: No such file or directory"),
        (["{tmp}/file"], "file: Not a directory"),
        (["{tree}", "dir={tmp}/nowhere"], "nowhere: No such file or directory"),
        (["{tree}", "prog=no-such-mkisofs"], "bad value 'no-such-mkisofs' for 'prog'"),
        (["{tree}", "params=--no-such-option"], "exited with status"),
        (["{tree}", "colour=red"], "unknown parameter 'colour'"),
    ],
)
def test_iso_bad_params_exit_1_saying_why(
    tmp_path: Path, tree: Path, args: list[str], said: str
) -> None:
    (tmp_path / "file").touch()
    words = [a.format(tmp=tmp_path, tree=tree) for a in args]
    status, stderr = node_exits(tmp_path, "iso", *words)
    assert status == 1 and said.format(tmp=tmp_path) in stderr, stderr


# floppy ---------------------------------------------------------------------------------------


def mtools_files(image: Path, out: Path, fix_geometry: bool = False) -> dict[str, bytes]:
    """The files of the FAT in `image`'s partition at 1 MiB, copied out with mtools. With
    `fix_geometry`, a heads/sectors geometry is put in the boot sector first: nbdkit 1.32 leaves
    them 0, which mtools refuses ("zero number of heads or sectors")."""
    if fix_geometry:
        with image.open("r+b") as f:
            f.seek(MiB + 24)
            f.write((63).to_bytes(2, "little") + (255).to_bytes(2, "little"))
    out.mkdir()
    env = {**os.environ, "MTOOLSRC": "/dev/null"}
    subprocess.run(["mcopy", "-s", "-m", "-n", "-i", f"{image}@@1M", "::*", f"{out}/"],
                   check=True, env=env, capture_output=True)  # fmt: skip
    return files_in(out)


def fat_probe(image: Path) -> dict[str, str]:
    out = run(["blkid", "-p", "-O", str(MiB), "-o", "export", str(image)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def mbr_entry(image: Path) -> tuple[int, int, int]:
    data = image.read_bytes()[446:462]
    return data[4], int.from_bytes(data[8:12], "little"), int.from_bytes(data[12:16], "little")


def test_floppy_serves_the_directory_as_fat32_in_an_mbr_partition(
    start_node: Callable[..., Proc], tree: Path, tmp_path: Path
) -> None:
    (tree / "link").symlink_to("etc/hostname")  # left out, as nbdkit
    node = start_node("floppy", str(tree), "label=MYFLOPPY")
    image = copy_of(node, tmp_path / "floppy.img")
    ptype, start, sectors = mbr_entry(image)
    assert (ptype, start) == (0x0C, 2048) and (start + sectors) * 512 == image.stat().st_size
    probe = fat_probe(image)
    assert probe["TYPE"] == "vfat" and probe["VERSION"] == "FAT32" and probe["LABEL"] == "MYFLOPPY"
    (tmp_path / "fs.img").write_bytes(image.read_bytes()[MiB:])
    fsck = subprocess.run(["fsck.vfat", "-n", str(tmp_path / "fs.img")], capture_output=True,
                          text=True)  # fmt: skip
    assert fsck.returncode == 0 and "Warning" not in fsck.stdout + fsck.stderr, fsck
    got = mtools_files(image, tmp_path / "out")
    assert got == files_in(tree) and "link" not in got
    write_refused(node)


def test_floppy_default_label_and_sizes(
    start_node: Callable[..., Proc], tree: Path, tmp_path: Path
) -> None:
    node = start_node("floppy", f"dir={tree}")
    image = copy_of(node, tmp_path / "default.img")
    assert fat_probe(image)["LABEL"] == "NBDKITFLOPY"
    assert image.stat().st_size < 40 * MiB  # about just enough (a FAT32's least)
    node = start_node("floppy", str(tree), "size=64M")
    assert capabilities(node.uri, ("export-size",))["export-size"] == 64 * MiB
    # Big files grow the disk until they fit.
    big = tmp_path / "big"
    big.mkdir()
    for i in range(3):
        (big / f"f{i}.bin").write_bytes(os.urandom(16 * MiB))
    node = start_node("floppy", str(big))
    image = copy_of(node, tmp_path / "big.img")
    assert mtools_files(image, tmp_path / "bigout") == files_in(big)


def test_floppy_matches_nbdkit(
    start_node: Callable[..., Proc], start_nbdkit: Callable[..., Proc], tree: Path, tmp_path: Path
) -> None:
    # size= big enough that nbdkit's 16 KiB clusters are a FAT32 mtools reads (65525 or more).
    args = (str(tree), "label=SAME", "size=1100M")
    ours, theirs = start_node("floppy", *args), start_nbdkit("floppy", *args)
    keys = ("export-size", *AGREED)
    assert capabilities(ours.uri, keys) == capabilities(theirs.uri, keys)
    got = {}
    for who, node in (("ours", ours), ("theirs", theirs)):
        image = copy_of(node, tmp_path / f"{who}.img")
        probe = fat_probe(image)
        got[who] = (
            mbr_entry(image),
            probe["LABEL"],
            probe["VERSION"],
            mtools_files(image, tmp_path / f"{who}-out", fix_geometry=who == "theirs"),
        )
    assert got["ours"] == got["theirs"]
    assert got["ours"][3] == files_in(tree)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        ([], "'dir' is required"),
        (["{tmp}/nowhere"], "dir={tmp}/nowhere: No such file or directory"),
        (["{tmp}/file"], "file: Not a directory"),
        (["{tree}", "label=TWELVE_CHARS"], "'label'"),
        (["{tree}", "label=é"], "'label'"),
        (["{tree}", "size=10M"], "bad value 10485760 for 'size'"),
        (["{tree}", "size=x"], "'size'"),
        (["{tree}", "colour=red"], "unknown parameter 'colour'"),
    ],
)
def test_floppy_bad_params_exit_1_saying_why(
    tmp_path: Path, tree: Path, args: list[str], said: str
) -> None:
    (tmp_path / "file").touch()
    words = [a.format(tmp=tmp_path, tree=tree) for a in args]
    status, stderr = node_exits(tmp_path, "floppy", *words)
    assert status == 1 and said.format(tmp=tmp_path) in stderr, stderr


def test_floppy_files_too_big_for_size_exit_1(tmp_path: Path, tree: Path) -> None:
    (tree / "big.bin").write_bytes(os.urandom(40 * MiB))
    status, stderr = node_exits(tmp_path, "floppy", str(tree), "size=36M")
    assert status == 1 and "do not fit" in stderr, stderr
