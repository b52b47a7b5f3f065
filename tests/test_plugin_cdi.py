"""The cdi plugin: a layer of a container image in the local docker engine, served read-only.

Images are built here with the docker SDK from a tmp build context (`FROM scratch`, `ADD
disk.img /disk/`: a KubeVirt containerDisk), never pulled: no test reaches a registry (the pull
path is tried against localhost:1, where nothing listens). Each export is checked with real
clients (nbdcopy, nbdinfo, qemu-img, libnbd) against the layer `docker save` gives and the
disk file put in. nbdkit 1.32's cdi plugin needs podman and jq; podman is not installed, so
the differential test runs nbdkit with a `podman` shim (a script in this file) that answers
the two commands nbdkit runs, `podman pull NAME` and `podman save --format oci-dir -o DIR
NAME`, from the docker engine: the layers served, their sizes and capabilities must agree.
Without a docker engine these tests skip, except under CI (env CI set), where they fail.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest
from conftest import NBDFABRIC, ROOT, Proc, capabilities, run, sha256_file, wait_for

MiB = 1 << 20
pytestmark = pytest.mark.timeout(600)

#: nbdkit's podman, played by the docker CLI: `pull` checks the image is there (no registry is
#: reached), `save --format oci-dir -o DIR NAME` writes each layer of `docker save` as
#: DIR/<its sha256> and DIR/manifest.json listing them, the layout nbdkit's jq reads.
PODMAN_SHIM = r"""
import hashlib, json, os, subprocess, sys, tarfile
args = sys.argv[1:]
if args[0] == "pull":
    sys.exit(subprocess.call(["docker", "image", "inspect", args[-1]], stdout=subprocess.DEVNULL))
assert args[:3] == ["save", "--format", "oci-dir"] and args[3] == "-o", args
out, name = args[4], args[5]
os.makedirs(out)
saved = subprocess.run(["docker", "save", name], capture_output=True, check=True).stdout
import io
with tarfile.open(fileobj=io.BytesIO(saved)) as archive:
    manifest = json.load(archive.extractfile("manifest.json"))
    digests = []
    for layer in manifest[0]["Layers"]:
        data = archive.extractfile(layer).read()
        digest = hashlib.sha256(data).hexdigest()
        with open(os.path.join(out, digest), "wb") as f:
            f.write(data)
        digests.append({"digest": "sha256:" + digest, "size": len(data)})
with open(os.path.join(out, "manifest.json"), "w") as f:
    json.dump({"schemaVersion": 2, "layers": digests}, f)
"""


# The engine and the images ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine() -> Any:
    try:
        import docker

        client = docker.from_env()
        client.ping()
    except Exception as exc:  # any failure to reach the engine
        reason = f"no docker engine: {exc}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return client


class Images:
    """Images built for the tests (each `FROM scratch`, one ADD per layer), removed at the end."""

    def __init__(self, engine: Any, root: Path) -> None:
        self.engine = engine
        self.root = root
        self.tags: list[str] = []
        self.run = uuid.uuid4().hex[:10]

    def build(self, label: str, layers: list[tuple[str, Path]]) -> str:
        """An image whose layer N is `ADD FILE DIR/` for (DIR, FILE) = layers[N]: the file
        keeps its name."""
        context = self.root / label
        context.mkdir()
        lines = ["FROM scratch"]
        for directory, source in layers:
            os.link(source, context / source.name)
            lines.append(f"ADD {source.name} {directory}")
        (context / "Dockerfile").write_text("\n".join(lines) + "\n")
        tag = f"nbdfabric-cdi-test-{self.run}:{label}"
        self.tags.append(tag)
        self.engine.images.build(path=str(context), tag=tag, rm=True, forcerm=True)
        return tag

    def remove(self) -> None:
        import docker.errors

        for tag in self.tags:
            try:
                self.engine.images.remove(tag, force=True)
            except docker.errors.NotFound:
                pass


@pytest.fixture(scope="module")
def images(engine: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Images]:
    made = Images(engine, tmp_path_factory.mktemp("cdi-images"))
    yield made
    made.remove()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The disks put in the images: random bytes of an odd size, a big sparse file with a
    few data runs, a second random disk and a qcow2 image."""
    root = tmp_path_factory.mktemp("cdi-files")
    out = {
        "random": root / "disk.img",
        "other": root / "a.img",
        "sparse": root / "sparse.img",
        "qcow2": root / "b.qcow2",
        "text": root / "hello.txt",
    }
    out["random"].write_bytes(os.urandom(3 * MiB + 123))
    out["other"].write_bytes(os.urandom(MiB))
    with out["sparse"].open("wb") as f:
        f.truncate(SPARSE_SIZE)
        for at in (0, 100 * MiB + 7, SPARSE_SIZE - 4096):
            f.seek(at)
            f.write(os.urandom(4096))
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(out["qcow2"]), "8M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 2M", str(out["qcow2"])])
    out["text"].write_text("no disk here\n")
    return out


SPARSE_SIZE = 256 * MiB


@pytest.fixture(scope="module")
def one(images: Images, files: dict[str, Path]) -> str:
    """A containerDisk: one layer holding disk/disk.img."""
    return images.build("one", [("/disk/", files["random"])])


@pytest.fixture(scope="module")
def two(images: Images, files: dict[str, Path]) -> str:
    """Two layers: disk/a.img, then disk/b.qcow2."""
    return images.build("two", [("/disk/", files["other"]), ("/disk/", files["qcow2"])])


# Helpers -----------------------------------------------------------------------------------------


def saved_layers(name: str) -> list[bytes]:
    """The layers of `name` as the docker CLI's `docker save` gives them (the oracle)."""
    saved = subprocess.run(["docker", "save", name], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(saved)) as archive:
        manifest = json.load(archive.extractfile("manifest.json"))  # type: ignore[arg-type]
        return [archive.extractfile(x).read() for x in manifest[0]["Layers"]]  # type: ignore[union-attr]


def members(layer: Path) -> dict[str, bytes]:
    """The regular files of a layer tar, by name."""
    with tarfile.open(layer) as archive:
        return {
            m.name: archive.extractfile(m).read()  # type: ignore[union-attr]
            for m in archive.getmembers()
            if m.isfile()
        }


def copy_of(node: Proc, path: Path) -> Path:
    run(["nbdcopy", node.uri, str(path)])
    return path


def node_exits(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """`nbdfabric node cdi ARGS` that must not start: its exit status and stderr."""
    res = subprocess.run(
        [*NBDFABRIC, "node", "cdi", *args, "--listen", f"unix:{tmp_path}/never.sock"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert "Traceback" not in res.stderr, res.stderr
    return res.returncode, res.stderr


def fresh_tmpdir(tmp_path: Path, name: str = "tmp") -> Path:
    tmp = tmp_path / name
    tmp.mkdir()
    return tmp


# Serving ----------------------------------------------------------------------------------------


def test_cdi_serves_layer_zero_as_the_layer_tar(
    start_node: Callable[..., Proc], one: str, files: dict[str, Path], tmp_path: Path
) -> None:
    node = start_node("cdi", one)
    layer = copy_of(node, tmp_path / "layer.tar")
    [expected] = saved_layers(one)
    assert sha256_file(layer) == hashlib.sha256(expected).hexdigest()
    assert members(layer) == {"disk/disk.img": files["random"].read_bytes()}
    assert capabilities(node.uri)["export-size"] == len(expected)
    # qemu-img reads the same bytes.
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(layer), node.uri])


def test_cdi_is_read_only_with_multi_conn_and_cache(
    start_node: Callable[..., Proc], one: str
) -> None:
    node = start_node("cdi", f"name={one}")
    caps = capabilities(node.uri)
    assert caps["is_read_only"] is True
    assert caps["can_multi_conn"] is True
    assert caps["can_cache"] is True
    assert not any(caps[k] for k in ("can_flush", "can_fua", "can_trim", "can_zero"))
    h = nbd.NBD()
    h.connect_uri(node.uri)
    with pytest.raises(nbd.Error) as exc:
        h.pwrite(b"x" * 512, 0)
    assert exc.value.errno == "EPERM"
    assert len(h.pread(512, 0)) == 512  # still serving
    h.shutdown()


def test_cdi_disk_through_the_tar_filter_is_the_disk_put_in(
    start_node: Callable[..., Proc], one: str, files: dict[str, Path], tmp_path: Path
) -> None:
    """nbdkit's recipe (cdi + tar filter) for the disk alone."""
    layer = start_node("cdi", one)
    disk = start_node("tar", "tar-entry=disk/disk.img", upstreams=[layer.uri])
    got = copy_of(disk, tmp_path / "disk.img")
    assert sha256_file(got) == sha256_file(files["random"])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(files["random"]), disk.uri])


def test_cdi_chain_command_serves_the_disk(one: str, files: dict[str, Path]) -> None:
    """The docstring's `nbdfabric chain ... --filter=tar cdi IMAGE tar-entry=...` line."""
    res = subprocess.run(
        [*NBDFABRIC, "chain", "-U", "-", "--filter=tar", "cdi", one, "tar-entry=disk/disk.img",
         "--run", 'nbdcopy "$uri" - | sha256sum'],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0] == sha256_file(files["random"])


def test_cdi_layer_picks_the_layer_and_counts_back_from_the_last(
    start_node: Callable[..., Proc], two: str, files: dict[str, Path], tmp_path: Path
) -> None:
    saved = saved_layers(two)
    assert len(saved) == 2
    wanted = {
        "0": {"disk/a.img": files["other"].read_bytes()},
        "1": {"disk/b.qcow2": files["qcow2"].read_bytes()},
        "-1": {"disk/b.qcow2": files["qcow2"].read_bytes()},
        "-2": {"disk/a.img": files["other"].read_bytes()},
    }
    for layer, content in wanted.items():
        node = start_node("cdi", two, f"layer={layer}")
        got = copy_of(node, tmp_path / f"layer{layer}.tar")
        assert members(got) == content, layer
        assert got.read_bytes() == saved[int(layer)], layer
        node.stop()
    default = start_node("cdi", two)
    assert members(copy_of(default, tmp_path / "default.tar")) == wanted["0"]


def test_cdi_status_names_the_layer_and_its_disk_entries(
    start_node: Callable[..., Proc], two: str, engine: Any
) -> None:
    """`ctl info`: the image, its id, the layer served of how many, the tar-entry names."""
    node = start_node("cdi", two, "layer=-1", control=True)
    res = subprocess.run(
        [*NBDFABRIC, "ctl", str(node.control), "info", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    status = json.loads(res.stdout)["status"]
    assert status["image"] == two and status["id"] == engine.images.get(two).id
    assert (status["layer"], status["layers"]) == (1, 2)
    assert status["disk_entries"] == ["disk/b.qcow2"]


@pytest.mark.parametrize("layer", ["2", "-3", "99"])
def test_cdi_layer_out_of_range_exits_1(tmp_path: Path, two: str, layer: str) -> None:
    status, said = node_exits(tmp_path, two, f"layer={layer}")
    assert status == 1
    assert "'layer'" in said and "has 2 layers" in said, said


def test_cdi_qcow2_disk_is_served_as_its_qcow2_bytes(
    start_node: Callable[..., Proc], two: str, files: dict[str, Path], tmp_path: Path
) -> None:
    """No conversion: the tar entry is the qcow2 file; qcow2dec over it gives the raw disk."""
    layer = start_node("cdi", two, "layer=1")
    entry = start_node("tar", "tar-entry=disk/b.qcow2", upstreams=[layer.uri])
    got = copy_of(entry, tmp_path / "b.qcow2")
    assert sha256_file(got) == sha256_file(files["qcow2"])
    info = json.loads(run(["qemu-img", "info", "--output=json", "-f", "qcow2", entry.uri]).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 8 * MiB
    raw = start_node("qcow2dec", upstreams=[entry.uri])
    run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(files["qcow2"]), raw.uri])


def test_cdi_big_sparse_disk_is_streamed_not_held_in_memory(
    start_node: Callable[..., Proc],
    images: Images,
    one: str,
    files: dict[str, Path],
    tmp_path: Path,
) -> None:
    """A 256 MiB disk, mostly zeros: the node's peak memory stays far below it, its temporary
    copy keeps the zeros as holes, and the bytes are right."""
    name = images.build("sparse", [("/disk/", files["sparse"])])
    tmp = fresh_tmpdir(tmp_path)
    small = start_node("cdi", one)  # a node that served 3 MiB
    baseline = peak_kib(small.pid)
    small.stop()
    node = start_node("cdi", name, env={"TMPDIR": str(tmp)})
    peak = peak_kib(node.pid)
    assert peak < baseline + 64 * 1024, (baseline, peak)
    # The copy is open, unlinked, and sparse.
    [held] = deleted_files_of(node.pid, tmp)
    assert os.stat(held).st_size > SPARSE_SIZE
    assert os.stat(held).st_blocks * 512 < 32 * MiB
    assert list(tmp.iterdir()) == []
    disk = start_node("tar", "tar-entry=disk/sparse.img", upstreams=[node.uri])
    got = copy_of(disk, tmp_path / "sparse.img")
    assert sha256_file(got) == sha256_file(files["sparse"])
    extents = json.loads(run(["nbdinfo", "--map", "--json", node.uri]).stdout)
    assert any(e["type"] & 1 for e in extents)  # holes reported


def peak_kib(pid: int) -> int:
    """The peak resident memory (VmHWM) of process `pid`, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def deleted_files_of(pid: int, directory: Path) -> list[str]:
    """The /proc/PID/fd links of files the process holds that were in `directory`, removed."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        link = f"/proc/{pid}/fd/{fd}"
        try:
            target = os.readlink(link)
        except OSError:
            continue
        if target.startswith(str(directory)) and target.endswith(" (deleted)"):
            found.append(link)
    return found


def test_cdi_image_without_disk_is_served_with_a_warning(
    start_node: Callable[..., Proc], images: Images, files: dict[str, Path], tmp_path: Path
) -> None:
    """nbdkit's plugin knows nothing of /disk: the layer is served whatever it holds."""
    name = images.build("nodisk", [("/etc/", files["text"])])
    node = start_node("cdi", name)
    assert members(copy_of(node, tmp_path / "layer.tar")) == {"etc/hello.txt": b"no disk here\n"}
    assert "holds nothing under /disk" in node.stderr()


# Errors and the temporary copy -----------------------------------------------------------------


def test_cdi_missing_local_image_exits_1_without_pulling(tmp_path: Path, engine: Any) -> None:
    status, said = node_exits(tmp_path, f"nbdfabric-cdi-test-missing-{uuid.uuid4().hex}:x")
    assert status == 1
    assert "no image" in said and "local docker engine" in said, said


def test_cdi_missing_image_of_a_registry_is_pulled_and_the_failure_said(
    tmp_path: Path, engine: Any
) -> None:
    """A registry host makes the node pull: at localhost:1 nothing listens, so it fails fast
    and without leaving the machine."""
    name = f"localhost:1/nbdfabric-cdi-missing:{uuid.uuid4().hex[:8]}"
    status, said = node_exits(tmp_path, f"docker://{name}")
    assert status == 1
    assert "localhost:1/nbdfabric-cdi-missing" in said, said


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("name=",), "'name'"),
        (("oci:/srv/image",), "transport"),
        (("layer=1.5", "x"), "'layer'"),
        ((), "'name'"),
    ],
)
def test_cdi_bad_params_exit_1(tmp_path: Path, args: tuple[str, ...], words: str) -> None:
    status, said = node_exits(tmp_path, *args)
    assert status == 1
    assert words in said, said


def test_cdi_without_an_engine_exits_1(tmp_path: Path) -> None:
    status, said = node_exits(
        tmp_path, "some-image", env={"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    )
    assert status == 1
    assert "no docker engine" in said, said


def test_cdi_leaves_nothing_in_tmpdir_serving_or_stopped(
    start_node: Callable[..., Proc], one: str, tmp_path: Path
) -> None:
    tmp = fresh_tmpdir(tmp_path)
    node = start_node("cdi", one, env={"TMPDIR": str(tmp)})
    assert list(tmp.iterdir()) == []  # the copy is unlinked once open
    assert len(deleted_files_of(node.pid, tmp)) == 1
    assert node.stop(signal.SIGTERM) == 0
    assert list(tmp.iterdir()) == []


def test_cdi_sigterm_while_saving_leaves_nothing_in_tmpdir(
    start_node: Callable[..., Proc], images: Images, files: dict[str, Path], tmp_path: Path
) -> None:
    """A stop signal while the image is being saved: the node finishes, then stops cleanly."""
    name = images.build("sigterm", [("/disk/", files["sparse"])])
    tmp = fresh_tmpdir(tmp_path)
    node = start_node("cdi", name, env={"TMPDIR": str(tmp)}, wait=False)
    wait_for(lambda: any(tmp.iterdir()) or node.proc.poll() is not None, 60, "the copy to begin")
    assert node.stop(signal.SIGTERM, timeout=120) == 0, node.stderr()
    assert list(tmp.iterdir()) == []


def test_cdi_honours_tmpdir(tmp_path: Path, one: str) -> None:
    """TMPDIR that is not a directory: the node says so (the copy would go there)."""
    status, said = node_exits(tmp_path, one, env={"TMPDIR": str(tmp_path / "absent")})
    assert status == 1
    assert "TMPDIR" in said, said


# Beside nbdkit ---------------------------------------------------------------------------------


@pytest.fixture
def podman(tmp_path: Path) -> dict[str, str]:
    """The environment that gives nbdkit the podman shim (and its own TMPDIR)."""
    bin_dir = tmp_path / "shim"
    bin_dir.mkdir()
    shim = bin_dir / "podman"
    shim.write_text(f"#!{sys.executable}\n{PODMAN_SHIM}")
    shim.chmod(0o755)
    tmp = fresh_tmpdir(tmp_path, "nbdkit-tmp")
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp)}


@pytest.mark.parametrize("layer", [None, "1", "-1", "-2"])
def test_cdi_serves_what_nbdkit_serves(
    start_node: Callable[..., Proc],
    start_nbdkit: Callable[..., Proc],
    podman: dict[str, str],
    two: str,
    tmp_path: Path,
    layer: str | None,
) -> None:
    args = (two,) if layer is None else (two, f"layer={layer}")
    ours = start_node("cdi", *args)
    theirs = start_nbdkit("cdi", *args, env=podman)
    assert capabilities(ours.uri) == capabilities(theirs.uri)
    a = copy_of(ours, tmp_path / "ours.tar")
    b = copy_of(theirs, tmp_path / "theirs.tar")
    assert sha256_file(a) == sha256_file(b)


def test_cdi_layer_out_of_range_fails_in_nbdkit_too(
    podman: dict[str, str], two: str, tmp_path: Path
) -> None:
    res = subprocess.run(
        ["nbdkit", "-f", "-U", str(tmp_path / "k.sock"), "cdi", two, "layer=2"],
        capture_output=True, text=True, timeout=60, env={**os.environ, **podman},
    )  # fmt: skip
    assert res.returncode == 1, res.stderr
