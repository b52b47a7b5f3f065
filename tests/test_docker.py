"""Docker: the image, generated compose stacks on the real engine, data from host clients.

Builds the image with scripts/build-image.sh (quick when unchanged), runs containers with
ports published on 127.0.0.1 only, checks data with qemu-img/nbdcopy/libnbd and checksums, and
leaves no container or network behind. A Kubernetes import Job's pod runs here too, its
containers started as a kubelet would (KubeletPod). Without an engine these tests skip, except
under CI (env CI set), where they fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, nbd_connect, run, sha256_file, wait_for

IMAGE = os.environ.get("NBDFABRIC_IMAGE", "nbdfabric:latest")
EXAMPLE = ROOT / "compose" / "example.yaml"
MiB = 1 << 20

pytestmark = pytest.mark.timeout(900)  # a fresh machine builds the base image first


def _engine() -> Any:
    missing = None
    if shutil.which("docker-compose") is None:
        missing = "docker-compose is not installed"
    try:
        import docker

        client = docker.from_env()
        client.ping()
    except Exception as exc:  # any failure to reach the engine
        missing = missing or f"no docker engine: {exc}"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    return client


@pytest.fixture(scope="module")
def engine() -> Any:
    return _engine()


@pytest.fixture(scope="module")
def image(engine: Any) -> str:
    started = time.monotonic()
    res = subprocess.run(
        [str(ROOT / "scripts" / "build-image.sh"), "--tag", IMAGE],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        # The venv running the tests builds the wheels (a worktree has no .venv of its own).
        env={**os.environ, "NBDFABRIC_PYTHON": sys.executable},
    )
    assert res.returncode == 0, f"build-image.sh failed:\n{res.stdout}\n{res.stderr}"
    print(f"image {IMAGE}: {time.monotonic() - started:.1f}s\n{res.stdout}")
    return IMAGE


def random_file(path: Path, size: int, seed: int) -> Path:
    data = hashlib.shake_256(seed.to_bytes(8, "big")).digest(size)
    path.write_bytes(data)
    return path


class Writer:
    """While in its `with`: a thread writing 256 KiB chunks of known data through `h` round the
    first `span` bytes, each noted in `model`; it counts the writes after `killed` is set, and
    stops at the first error (kept in `errors`: a client must see none while a member dies)."""

    chunk = 256 * 1024

    def __init__(self, h: Any, model: bytearray, span: int, join_timeout: float) -> None:
        self.h, self.model, self.span, self.join_timeout = h, model, span, join_timeout
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.killed = threading.Event()
        self.after_kill = 0
        self.thread = threading.Thread(target=self.load)

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(self.join_timeout)

    def load(self) -> None:
        i = 0
        try:
            while not self.stop.is_set():
                off = (i * self.chunk * 7) % self.span
                data = hashlib.shake_256(i.to_bytes(8, "big")).digest(self.chunk)
                self.h.pwrite(data, off)
                self.model[off : off + self.chunk] = data
                if self.killed.is_set():
                    self.after_kill += 1
                i += 1
        except BaseException as exc:
            self.errors.append(exc)

    def wait_after_kill(self, writes: int, timeout: float) -> None:
        """Until `writes` writes have succeeded since the kill, or one failed."""
        wait_for(lambda: self.after_kill >= writes or self.errors, timeout, "writes after the kill")


def host_port(container: Any, port: int = 10809) -> int:
    container.reload()
    binding = container.attrs["NetworkSettings"]["Ports"][f"{port}/tcp"][0]
    assert binding["HostIp"] == "127.0.0.1"
    return int(binding["HostPort"])


def wait_healthy(container: Any, timeout: float = 60) -> None:
    def healthy() -> bool:
        container.reload()
        state = container.attrs["State"]
        if state["Status"] in ("exited", "dead"):
            raise AssertionError(f"{container.name} exited: {container.logs().decode()}")
        return state.get("Health", {}).get("Status") == "healthy"

    wait_for(healthy, timeout, f"{container.name} to be healthy")


# -- the image ---------------------------------------------------------------------------------


@pytest.fixture
def node_container(engine: Any, image: str) -> Iterator[Any]:
    name = f"nbdfabric-test-{uuid.uuid4().hex[:8]}"
    container = engine.containers.run(
        image,
        ["node", "memory", "64M", "--listen", "0.0.0.0:10809", "--export-name", "disk"],
        name=name,
        detach=True,
        ports={"10809/tcp": ("127.0.0.1", None)},
        labels={"io.nbdfabric.test": "1"},
    )
    try:
        yield container
    finally:
        container.remove(force=True)


def test_docker_image_serves_qemu_img_on_loopback(node_container: Any, tmp_path: Path) -> None:
    wait_healthy(node_container)
    uri = f"nbd://127.0.0.1:{host_port(node_container)}/disk"
    info = json.loads(run(["qemu-img", "info", "--output=json", uri]).stdout)
    assert info["virtual-size"] == 64 * MiB
    src = random_file(tmp_path / "src.img", 64 * MiB, seed=1)
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri])
    back = tmp_path / "back.img"
    run(["nbdcopy", uri, str(back)])
    assert sha256_file(back) == sha256_file(src)


def test_docker_image_runs_as_non_root_under_tini(node_container: Any) -> None:
    wait_healthy(node_container)
    uid = node_container.exec_run(["id", "-u"]).output.decode().strip()
    assert uid != "0"
    pid1 = node_container.exec_run(["cat", "/proc/1/cmdline"]).output.split(b"\0")[0]
    assert pid1.endswith(b"tini")
    started = time.monotonic()
    node_container.stop(timeout=10)  # SIGTERM reaches the node through tini
    node_container.reload()
    assert node_container.attrs["State"]["ExitCode"] == 0
    assert time.monotonic() - started < 8


def test_docker_image_imports_nbd_and_lists_kinds(engine: Any, image: str) -> None:
    out = engine.containers.run(image, ["kinds"], remove=True).decode()
    assert "memory" in out and "mirror" in out
    # asyncssh (the ssh plugin's) is imported only when such a node starts: check it is there.
    py = ["/opt/nbdfabric/bin/python", "-c",
          "import asyncssh, nbd; print(nbd.NBD().get_version())"]  # fmt: skip
    out = engine.containers.run(image, [], entrypoint=py, remove=True)
    assert out.strip()


def test_docker_image_has_the_tools_the_disk_making_kinds_run(
    engine: Any, image: str, tmp_path: Path
) -> None:
    """iso (xorriso), floppy (mkfs.vfat, mtools), linuxdisk and tmpdisk (mke2fs), sh (bash) and
    python (an nbdkit python script) make their disks inside the container, as the nodes'
    user: each serves a disk there that nbdinfo, in the same container, reads."""
    files = tmp_path / "files"
    files.mkdir()
    (files / "hello.txt").write_text("hello\n")
    files.chmod(0o755)
    script = files / "disk.sh"
    script.write_text('#!/bin/bash\ncase "$1" in get_size) echo 1M ;; pread) '
                      'dd if=/dev/zero count=$3 iflag=count_bytes status=none ;; '
                      '*) exit 2 ;; esac\n')  # fmt: skip
    script.chmod(0o755)
    (files / "ram.py").write_text(
        "import nbdkit\nAPI_VERSION = 2\n"
        "def open(readonly): return bytearray(1 << 20)\n"
        "def get_size(h): return len(h)\n"
        "def pread(h, buf, offset, flags): buf[:] = h[offset:offset + len(buf)]\n"
    )
    mounts = {str(files): {"bind": "/files", "mode": "ro"}}
    for words, minimum in (
        (["iso", "/files"], 32 * 1024),
        (["floppy", "/files"], 32 << 20),
        (["linuxdisk", "/files"], 1 << 20),
        (["tmpdisk", "64M"], 64 << 20),
        (["sh", "/files/disk.sh"], 1 << 20),
        (["python", "/files/ram.py"], 1 << 20),
    ):
        out = engine.containers.run(
            image, ["node", *words, "-U", "-", "--run", 'nbdinfo --size "$uri"'],
            volumes=mounts, remove=True,
        )  # fmt: skip
        assert int(out.decode().split()[-1]) >= minimum, (words, out)


# -- compose -------------------------------------------------------------------------------------


def test_compose_top_level_file_is_fresh_and_valid(engine: Any) -> None:
    run([str(ROOT / "compose" / "gen.sh"), "--check"])
    run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"])


def test_compose_output_is_valid_compose(tmp_path: Path, engine: Any) -> None:
    out = tmp_path / "docker-compose.yml"
    run([*_nbdfabric(), "compose", str(EXAMPLE), "-o", str(out)])
    config = yaml.safe_load(run(["docker-compose", "-f", str(out), "config"]).stdout)
    services = config["services"]
    assert set(services) == {"disk-a", "disk-b", "mirror", "slow"}
    assert services["slow"]["depends_on"]["mirror"]["condition"] == "service_healthy"
    assert services["slow"]["ports"] == ["127.0.0.1:10809:10809/tcp"]
    assert services["mirror"]["labels"]["io.nbdfabric.kind"] == "mirror"
    assert "--upstream" in services["mirror"]["command"]
    assert "nbd://disk-a:10809/" in services["mirror"]["command"]


def _nbdfabric() -> list[str]:
    return [str(ROOT / ".venv" / "bin" / "python"), "-m", "nodes.cli"]


class Stack:
    """A compose project made from a topology (with the export on an ephemeral port)."""

    def __init__(self, engine: Any, file: Path, project: str) -> None:
        self.engine, self.file, self.project = engine, file, project

    def compose(self, *args: str, timeout: float = 180) -> str:
        cmd = ["docker-compose", "-f", str(self.file), "-p", self.project, *args]
        return run(cmd, timeout=timeout).stdout

    def container(self, service: str) -> Any:
        found = self.engine.containers.list(
            all=True,
            filters={
                "label": [
                    f"com.docker.compose.project={self.project}",
                    f"com.docker.compose.service={service}",
                ]
            },
        )
        assert len(found) == 1, f"{service}: {found}"
        return found[0]

    def leftovers(self) -> list[str]:
        label = f"com.docker.compose.project={self.project}"
        containers = self.engine.containers.list(all=True, filters={"label": label})
        networks = self.engine.networks.list(filters={"label": label})
        return [c.name for c in containers] + [n.name for n in networks]

    def members(self) -> list[dict[str, Any]]:
        res = self.container("mirror").exec_run(
            ["nbdfabric", "ctl", "127.0.0.1:10810", "members", "--json"]
        )
        assert res.exit_code == 0, res.output.decode()
        return json.loads(res.output)["members"]

    def member_sha256(self, service: str) -> str:
        # Read inside the compose network: members are not published on the host.
        res = self.container("mirror").exec_run(
            ["sh", "-c", f"nbdcopy nbd://{service}:10809/ - | sha256sum"]
        )
        assert res.exit_code == 0, res.output.decode()
        return res.output.decode().split()[0]


@pytest.fixture
def stack(engine: Any, image: str, tmp_path: Path) -> Iterator[Stack]:
    topo = yaml.safe_load(EXAMPLE.read_text())
    topo["exports"]["vm1"]["listen"] = ["127.0.0.1:0"]
    (tmp_path / "fabric.yaml").write_text(yaml.safe_dump(topo))
    out = tmp_path / "docker-compose.yml"
    run([*_nbdfabric(), "compose", str(tmp_path / "fabric.yaml"), "-o", str(out)])
    s = Stack(engine, out, f"nbdfabrictest{uuid.uuid4().hex[:8]}")
    try:
        s.compose("up", "-d")
        for service in ("disk-a", "disk-b", "mirror", "slow"):
            wait_healthy(s.container(service))
        yield s
    finally:
        s.compose("down", "--timeout", "10")
    assert s.leftovers() == []


def test_compose_example_up_serves_data_and_down_leaves_nothing(
    stack: Stack, tmp_path: Path
) -> None:
    port = int(stack.compose("port", "slow", "10809").strip().rsplit(":", 1)[1])
    uri = f"nbd://127.0.0.1:{port}/vm1"
    src = random_file(tmp_path / "src.img", 32 * MiB, seed=2)
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri])
    back = tmp_path / "back.img"
    run(["nbdcopy", uri, str(back)])
    size = back.stat().st_size
    assert size == 256 * MiB
    expect = hashlib.sha256(src.read_bytes() + bytes(size - 32 * MiB)).hexdigest()
    assert sha256_file(back) == expect
    # Both mirror members hold the same data, read inside the compose network.
    assert stack.member_sha256("disk-a") == stack.member_sha256("disk-b") == expect


def test_compose_mirror_survives_docker_kill_and_rebuilds(stack: Stack) -> None:
    port = int(stack.compose("port", "slow", "10809").strip().rsplit(":", 1)[1])
    h = nbd_connect(f"nbd://127.0.0.1:{port}/vm1")
    size = 16 * MiB
    model = bytearray(size)
    with Writer(h, model, size, join_timeout=30) as writer:
        time.sleep(0.5)
        stack.container("disk-b").kill()
        writer.killed.set()
        writer.wait_after_kill(40, 30)
        states = {m["uri"]: m["state"] for m in stack.members()}
        assert states["nbd://disk-b:10809/"] == "faulty"
        assert states["nbd://disk-a:10809/"] == "in_sync"
    assert not writer.errors, f"client saw an error: {writer.errors[0]!r}"
    h.flush()
    assert h.pread(size, 0) == model

    stack.container("disk-b").start()
    wait_for(
        lambda: all(m["state"] == "in_sync" for m in stack.members()),
        60,
        "the restarted member to be rebuilt",
    )
    h.shutdown()
    expect = hashlib.sha256(bytes(model) + bytes(256 * MiB - size)).hexdigest()
    assert stack.member_sha256("disk-a") == stack.member_sha256("disk-b") == expect

    # The mirror's own container killed while disk-b is out: docker restarts the same
    # container, whose bitmap-file still says disk-b missed writes; it is not read.
    res = stack.container("mirror").exec_run(["nbdfabric", "ctl", "127.0.0.1:10810", "faulty", "1"])
    assert res.exit_code == 0, res.output.decode()
    h = nbd_connect(f"nbd://127.0.0.1:{port}/vm1")
    h.pwrite(b"\x77" * size, 0)
    h.flush()
    h.shutdown()
    mirror = stack.container("mirror")
    # A crash, not `docker kill` (docker takes that as a stop and does not restart): the node
    # process under tini dies, tini exits with its status, the restart policy applies.
    res = mirror.exec_run(["sh", "-c", "kill -9 $(cat /proc/1/task/1/children)"])
    assert res.exit_code == 0, res.output.decode()

    def back() -> bool:
        mirror.reload()
        health = mirror.attrs["State"].get("Health", {}).get("Status")
        return mirror.attrs["RestartCount"] >= 1 and health == "healthy"

    wait_for(back, 120, "docker to restart the mirror's container")
    assert [m["state"] for m in stack.members()] == ["in_sync", "faulty"]
    for _ in range(4):
        h = nbd_connect(f"nbd://127.0.0.1:{port}/vm1")
        assert h.pread(size, 0) == b"\x77" * size
        h.shutdown()


# -- the docker backend --------------------------------------------------------------------------


def test_docker_backend_up_serves_data_status_and_down(
    engine: Any, image: str, tmp_path: Path
) -> None:
    from orchestrator.backends.docker import DockerFabric
    from orchestrator.topology import load

    topo_data = yaml.safe_load(EXAMPLE.read_text())
    topo_data["name"] = f"dockertest{uuid.uuid4().hex[:8]}"
    topo_data["exports"]["vm1"]["listen"] = ["127.0.0.1:0"]
    (tmp_path / "fabric.yaml").write_text(yaml.safe_dump(topo_data))
    topology = load(tmp_path / "fabric.yaml")
    fabric = DockerFabric(engine, image)
    try:
        uris = fabric.up(topology)
        assert set(uris) == {"vm1"} and uris["vm1"].startswith("nbd://127.0.0.1:")
        status = {s.name: s for s in fabric.status(topology.name)}
        assert set(status) == {"disk-a", "disk-b", "mirror", "slow"}
        assert all(s.state == "running" and s.health == "healthy" for s in status.values())
        assert all(len(s.container_id) == 12 for s in status.values())
        src = random_file(tmp_path / "src.img", 16 * MiB, seed=3)
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uris["vm1"]])
        back = tmp_path / "back.img"
        run(["nbdcopy", "--requests=4", uris["vm1"], str(back)])
        expect = hashlib.sha256(src.read_bytes() + bytes(240 * MiB)).hexdigest()
        assert sha256_file(back) == expect
        # Up again is a no-op for running, healthy nodes.
        ids = {s.name: s.container_id for s in fabric.status(topology.name)}
        fabric.up(topology)
        assert {s.name: s.container_id for s in fabric.status(topology.name)} == ids
    finally:
        fabric.down(topology.name, topology)
    label = f"io.nbdfabric.fabric={topology.name}"
    assert engine.containers.list(all=True, filters={"label": label}) == []
    assert engine.networks.list(filters={"label": label}) == []


# -- `nbdfabric up --backend docker`: the supervisor over containers -------------------------------


class CliFabric:
    """`nbdfabric up --backend docker --detach` of a topology in tmp_path, through the CLI."""

    def __init__(self, engine: Any, tmp_path: Path, text: str, name: str) -> None:
        self.engine, self.name, self.dir = engine, name, tmp_path
        self.file = tmp_path / "fabric.yaml"
        self.file.write_text(text)
        self.env = {**os.environ, "NBDFABRIC_RUN_DIR": str(tmp_path / "r")}

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [*_nbdfabric(), *args], cwd=self.dir, env=self.env, capture_output=True, text=True
        )
        if check and res.returncode != 0:
            raise AssertionError(
                f"nbdfabric {args} exited {res.returncode}\n{res.stdout}{res.stderr}"
            )
        return res

    def status(self) -> dict[str, dict[str, Any]]:
        return {n["name"]: n for n in json.loads(self.cli("status", "--json").stdout)}

    def leftovers(self) -> list[str]:
        label = f"io.nbdfabric.fabric={self.name}"
        containers = self.engine.containers.list(all=True, filters={"label": label})
        networks = self.engine.networks.list(filters={"label": label})
        volumes = self.engine.volumes.list(filters={"label": label})
        return [c.name for c in containers] + [n.name for n in networks] + [v.name for v in volumes]

    def member_sha256(self, node: str) -> str:
        mirror = self.engine.containers.get(self.status()["mirror"]["container_id"])
        res = mirror.exec_run(
            ["sh", "-c", f"nbdcopy nbd://{self.name}-{node}:10809/ - | sha256sum"]
        )
        assert res.exit_code == 0, res.output.decode()
        return res.output.decode().split()[0]


DOCKER_MIRROR = """\
name: {name}
nodes:
  m0: {{kind: memory, params: {{size: 64M}}}}
  m1: {{kind: memory, params: {{size: 64M}}}}
  mirror: {{kind: mirror, upstreams: [m0, m1]}}
exports:
  vm: {{node: mirror, listen: ["127.0.0.1:0"]}}
"""


def test_docker_backend_cli_supervises_mirror_through_docker_kill(
    engine: Any, image: str, tmp_path: Path
) -> None:
    name = f"dk{uuid.uuid4().hex[:8]}"
    fab = CliFabric(engine, tmp_path, DOCKER_MIRROR.format(name=name), name)
    try:
        out = fab.cli("up", "--detach", "--backend", "docker", "--image", image).stdout
        assert "docker backend" in out, out
        uri = next(w for w in out.split() if w.startswith("nbd://127.0.0.1:"))
        nodes = fab.status()
        assert list(nodes) == ["m0", "m1", "mirror"]
        for n in nodes.values():
            assert (n["state"], n["health"], n["pid"], n["restarts"]) == (
                "running",
                "SERVING",
                0,
                0,
            )
            assert len(n["container_id"]) == 12
            assert engine.containers.get(n["container_id"]).labels["io.nbdfabric.node"] == n["name"]
        assert [m["state"] for m in nodes["mirror"]["members"]] == ["in_sync", "in_sync"]
        assert nodes["mirror"]["export_uris"] == [uri]
        assert "CONTAINER" in fab.cli("status").stdout
        # Re-running up with the other backend is refused while this one runs.
        res = fab.cli("up", "--detach", "--backend", "process", check=False)
        assert res.returncode == 1 and "runs on the docker backend" in res.stderr

        size = 64 * MiB
        src = random_file(tmp_path / "src.img", 16 * MiB, seed=4)
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri])
        back = tmp_path / "back.img"
        run(["nbdcopy", uri, str(back)])
        model = bytearray(src.read_bytes() + bytes(size - 16 * MiB))
        assert sha256_file(back) == hashlib.sha256(model).hexdigest()

        h = nbd_connect(uri)
        victim = nodes["m1"]["container_id"]
        with Writer(h, model, 32 * MiB, join_timeout=60) as writer:
            time.sleep(0.5)
            engine.containers.get(victim).kill()
            writer.killed.set()
            writer.wait_after_kill(40, 60)
        assert not writer.errors, f"client saw an error: {writer.errors[0]!r}"

        def restarted() -> bool:
            m1 = fab.status()["m1"]
            return (
                m1["restarts"] == 1 and m1["health"] == "SERVING" and m1["container_id"] != victim
            )

        wait_for(restarted, 120, "the supervisor to restart m1's container")

        def rebuilt() -> bool:
            members = fab.status()["mirror"]["members"]
            return (
                all(m["state"] == "in_sync" for m in members)
                and members[1]["detail"]["resync_bytes"] > 0
            )

        wait_for(rebuilt, 120, "the mirror to rebuild m1")
        h.flush()
        step = 4 * MiB  # below the server's maximum block size
        got = b"".join(h.pread(step, off) for off in range(0, size, step))
        assert got == model
        h.shutdown()
        expect = hashlib.sha256(model).hexdigest()
        assert fab.member_sha256("m0") == fab.member_sha256("m1") == expect
        events = fab.cli("events", "--no-follow").stdout
        assert "m1: exited: exited with status 137" in events, events
        assert "m1: restarted: container" in events
        assert "--- nbdfabric: container" in fab.cli("logs", "m1").stdout
        # `stop`, `start` and `restart` as with local processes: a stopped container is gone
        # and stays so; a restarted memory member comes back empty and is rebuilt.
        gone = fab.status()["m1"]["container_id"]
        assert fab.cli("stop", "m1").stdout == "m1: stopped\n"
        assert fab.status()["m1"]["state"] == "stopped" and _gone(engine, gone)
        assert fab.cli("start", "m1").stdout.startswith("m1: started (container ")
        wait_for(rebuilt, 120, "the mirror to rebuild m1 after its start")
        before = fab.status()["m0"]["container_id"]
        res = fab.cli("restart", "m0")
        assert res.stdout.startswith("m0: restarted (container ") and before not in res.stdout
        wait_for(lambda: all(m["state"] == "in_sync" for m in fab.status()["mirror"]["members"]),
                 120, "the mirror to rebuild m0 after its restart")  # fmt: skip
        assert fab.member_sha256("m0") == fab.member_sha256("m1") == expect
    finally:
        res = fab.cli("down", check=False)
    assert res.returncode == 0, res.stderr
    assert fab.leftovers() == []
    assert fab.cli("status", check=False).returncode == 3


def _gone(engine: Any, container_id: str) -> bool:
    import docker.errors

    try:
        engine.containers.get(container_id)
    except docker.errors.NotFound:
        return True
    return False


def test_docker_backend_mirror_container_killed_keeps_its_faulty_member(
    engine: Any, image: str, tmp_path: Path
) -> None:
    """The mirror's container keeps its bitmap-file on a volume of its own, so the new container
    the supervisor starts after a `docker kill` still knows member 0 missed writes."""
    name = f"dk{uuid.uuid4().hex[:8]}"
    fab = CliFabric(engine, tmp_path, DOCKER_MIRROR.format(name=name), name)
    try:
        out = fab.cli("up", "--detach", "--backend", "docker", "--image", image).stdout
        uri = next(w for w in out.split() if w.startswith("nbd://127.0.0.1:"))
        assert f"{name}-mirror-state" in fab.leftovers()
        control = fab.status()["mirror"]["control"]
        new = os.urandom(4 * MiB)
        run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x11 0 4M", "-c", "flush"])
        fab.cli("ctl", control, "faulty", "0")
        h = nbd_connect(uri)
        h.pwrite(new, 0)
        h.flush()
        h.shutdown()
        victim = fab.status()["mirror"]["container_id"]
        engine.containers.get(victim).kill()

        def back() -> bool:
            m = fab.status()["mirror"]
            return m["restarts"] == 1 and m["health"] == "SERVING" and m["container_id"] != victim

        wait_for(back, 120, "the supervisor to restart the mirror's container")
        mirror = fab.status()["mirror"]
        assert [m["state"] for m in mirror["members"]] == ["faulty", "in_sync"]
        h = nbd_connect(mirror["export_uris"][0])  # a new container: a new ephemeral port
        for _ in range(4):  # whichever member a read policy picks, only member 1 may answer
            assert h.pread(4 * MiB, 0) == new
        h.shutdown()
    finally:
        res = fab.cli("down", check=False)
    assert res.returncode == 0, res.stderr
    assert fab.leftovers() == []


def test_docker_backend_down_after_the_supervisor_died(
    engine: Any, image: str, tmp_path: Path
) -> None:
    name = f"dk{uuid.uuid4().hex[:8]}"
    text = f"name: {name}\nnodes:\n  a: {{kind: memory, params: {{size: 1M}}}}\n"
    fab = CliFabric(engine, tmp_path, text, name)
    try:
        fab.cli("up", "--detach", "--backend", "docker", "--image", image)
        assert len(fab.leftovers()) == 2  # the container and the network
        state = json.loads((tmp_path / "r" / name / "state.json").read_text())
        assert state["backend"] == "docker"
        pid = int((tmp_path / "r" / name / "orchestrator.pid").read_text())
        os.kill(pid, 9)
        wait_for(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), 30, "supervisor exit")
    finally:
        fab.cli("down", check=False)
    assert fab.leftovers() == []


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


# -- `nbdfabric k8s --import-to`: the Job's pod, run as a kubelet would ---------------------------

K8S_IMPORT = ROOT / "compose" / "k8s-import.yaml"
HTTP_SERVER = ROOT / "bench" / "http_server.py"


class KubeletPod:
    """The pod spec of a manifest on the docker engine, run as a kubelet would run it: one
    network namespace (a pause container's, with loopback only: nothing leaves the pod), the
    pod's volumes as host directories (emptyDir world-writable, a claim as a fresh volume's
    root-owned directory; fsGroup makes both the group's and adds it to every container), each
    container's command/args/env/mounts/user from the spec. Init containers start in order; a
    native sidecar (restartPolicy: Always) counts as started once its startupProbe passes, probed
    every periodSeconds up to failureThreshold times. Every container made carries `labels`.
    A secret volume is the files of `secrets[secretName]` (a host directory: what `kubectl
    create secret generic NAME --from-file=DIR` would hold), root-owned with defaultMode and,
    with fsGroup, the group's."""

    def __init__(
        self,
        engine: Any,
        image: str,
        spec: dict[str, Any],
        workdir: Path,
        secrets: dict[str, Path] | None = None,
    ) -> None:
        self.engine, self.image, self.spec = engine, image, spec
        self.secrets = secrets or {}
        self.name = f"nbdfabric-pod-{uuid.uuid4().hex[:8]}"
        self.labels = {"io.nbdfabric.test": "1", "io.nbdfabric.test.pod": self.name}
        self.sidecars: list[Any] = []
        self.volumes = self._volumes(workdir)
        self.pause: Any = None

    def start(self) -> None:
        """The pod's sandbox: its network namespace, with loopback only."""
        self.pause = self.engine.containers.run(
            self.image,
            entrypoint=["sleep", "infinity"],
            name=f"{self.name}-pause",
            network_mode="none",
            labels=self.labels,
            detach=True,
        )

    def _volumes(self, workdir: Path) -> dict[str, Path]:
        fs_group = self.spec.get("securityContext", {}).get("fsGroup")
        dirs = {}
        for vol in self.spec.get("volumes", []):
            host = workdir / vol["name"]
            host.mkdir(parents=True)
            if "emptyDir" in vol:
                mode = 0o777  # as kubelet makes them
            elif "persistentVolumeClaim" in vol:
                mode = 0o755  # a fresh filesystem's root, owned by root
            elif "secret" in vol:
                name = vol["secret"]["secretName"]
                assert name in self.secrets, f"volume {vol['name']}: no Secret {name!r} exists"
                file_mode = vol["secret"].get("defaultMode", 0o644)
                for item in self.secrets[name].iterdir():
                    copy = host / item.name
                    shutil.copyfile(item, copy)
                    os.chown(copy, 0, fs_group if fs_group is not None else 0)
                    copy.chmod(file_mode)
                host.chmod(0o755)
                dirs[vol["name"]] = host
                continue  # (kubelet: files group-owned by fsGroup, the directory not writable)
            else:
                raise AssertionError(f"volume {vol['name']}: only emptyDir, claims, secrets: {vol}")
            if fs_group is not None:  # kubelet's volume ownership: group rw, setgid
                os.chown(host, 0, fs_group)
                mode |= 0o2070
            host.chmod(mode)
            dirs[vol["name"]] = host
        return dirs

    def claim_dir(self, claim: str) -> Path:
        (vol,) = [
            v["name"]
            for v in self.spec["volumes"]
            if v.get("persistentVolumeClaim", {}).get("claimName") == claim
        ]
        return self.volumes[vol]

    def host_path(self, container: dict[str, Any], path: str) -> Path:
        """Where `path` inside `container` is on the host, through its volume mounts."""
        for m in container["volumeMounts"]:
            rel = os.path.relpath(path, m["mountPath"])
            if not rel.startswith(".."):
                return self.volumes[m["name"]] / rel
        raise AssertionError(f"{path} is on no volume of container {container['name']}")

    def _user(self, container: dict[str, Any]) -> tuple[str | None, list[int]]:
        sc = {**self.spec.get("securityContext", {}), **container.get("securityContext", {})}
        uid, gid = sc.get("runAsUser"), sc.get("runAsGroup")
        if sc.get("runAsNonRoot"):
            if uid is None:  # kubelet checks the image's user, and refuses a non-numeric one
                user = self.engine.images.get(self.image).attrs["Config"]["User"]
                assert user.isdigit() and user != "0", (
                    f"{container['name']}: runAsNonRoot without runAsUser, image user {user!r}: "
                    "kubelet refuses to start it (CreateContainerConfigError)"
                )
            assert uid != 0, f"{container['name']}: runAsNonRoot with runAsUser 0"
        user = None if uid is None else str(uid) if gid is None else f"{uid}:{gid}"
        fs_group = sc.get("fsGroup")
        return user, [] if fs_group is None else [fs_group]

    def run(self, container: dict[str, Any]) -> Any:
        """Create and start `container` of the spec."""
        from docker.types import Mount

        # Probes are run by start_sidecar (startup) and start_containers (readiness); liveness
        # is not: nothing here kills a container that fails it.
        for field in ("envFrom", "lifecycle"):
            assert field not in container, f"{container['name']}: {field} is not run here"
        env = {e["name"]: e["value"] for e in container.get("env", [])}  # plain values only
        mounts = []
        for m in container.get("volumeMounts", []):
            assert "subPath" not in m, f"{container['name']}: subPath is not run here"
            source = str(self.volumes[m["name"]])
            read_only = bool(m.get("readOnly"))
            mounts.append(Mount(m["mountPath"], source, type="bind", read_only=read_only))
        user, groups = self._user(container)
        # The manifest names the image a cluster would pull (nbdfabric:latest by default); here
        # it is the image this module built from this tree, under whatever tag it has.
        return self.engine.containers.run(
            self.image,
            # As in Kubernetes: command replaces the image's ENTRYPOINT, args its CMD, and a
            # command without args runs without the image's CMD too.
            entrypoint=container.get("command"),
            command=container.get("args", [] if container.get("command") else None),
            environment=env,
            working_dir=container.get("workingDir"),
            user=user,
            group_add=groups,
            mounts=mounts,
            network_mode=f"container:{self.pause.id}",
            name=f"{self.name}-{container['name']}",
            labels=self.labels,
            detach=True,
        )

    def _probe(self, container: Any, command: list[str], timeout: float) -> tuple[bool, str]:
        """One exec probe, given up after `timeout` (timeoutSeconds) as kubelet does."""
        import docker

        api = self.engine.api
        try:
            exec_id = api.exec_create(container.id, command)["Id"]
        except docker.errors.APIError as exc:  # it stopped since: the caller says how
            return False, str(exc)
        out: list[bytes] = []
        runner = threading.Thread(target=lambda: out.append(api.exec_start(exec_id)), daemon=True)
        runner.start()
        runner.join(timeout)
        if not out:
            return False, f"no answer in {timeout} s"
        code = api.exec_inspect(exec_id)["ExitCode"]
        return code == 0, f"exit {code}: {out[0].decode(errors='replace').strip()}"

    def exited(self, container: Any) -> str:
        """How `container` ended and its log; "" while it runs."""
        container.reload()
        state = container.attrs["State"]
        if state["Status"] not in ("exited", "dead"):
            return ""
        return f"exited {state['ExitCode']}; its log:\n{container.logs().decode(errors='replace')}"

    def start_sidecar(self, spec: dict[str, Any]) -> None:
        """Start a native sidecar and wait until its startupProbe passes (started)."""
        container = self.run(spec)
        self.sidecars.append(container)
        probe = spec.get("startupProbe")
        if probe is None:
            return  # started once running
        command = probe["exec"]["command"]
        period = probe.get("periodSeconds", 10)
        threshold = probe.get("failureThreshold", 3)
        time.sleep(probe.get("initialDelaySeconds", 0))
        for _ in range(threshold):
            exited = self.exited(container)
            if exited:
                raise AssertionError(f"sidecar {spec['name']} (kubelet would restart it) {exited}")
            passed, answer = self._probe(container, command, probe.get("timeoutSeconds", 1))
            if passed:
                return
            time.sleep(period)
        raise AssertionError(
            f"sidecar {spec['name']}: startup probe {command} failed {threshold} times, "
            f"last {answer} (kubelet would kill and restart it); its log:\n"
            + container.logs().decode(errors="replace")
        )

    def start_containers(self, timeout: float = 60) -> None:
        """Start the pod's (long-running) containers all at once, as kubelet does, and wait
        until every one passes its readinessProbe (the pod is Ready)."""
        started = [(spec, self.run(spec)) for spec in self.spec["containers"]]
        self.sidecars += [container for _, container in started]
        deadline = time.monotonic() + timeout
        for spec, container in started:
            probe = spec.get("readinessProbe")
            while probe is not None:
                exited = self.exited(container)
                assert not exited, f"container {spec['name']} (kubelet would restart it) {exited}"
                ready, answer = self._probe(
                    container, probe["exec"]["command"], probe.get("timeoutSeconds", 1)
                )
                if ready:
                    break
                assert time.monotonic() < deadline, (
                    f"container {spec['name']} not ready in {timeout} s, last {answer}; its "
                    "log:\n" + container.logs().decode(errors="replace")
                )
                time.sleep(0.5)

    def client(
        self, entrypoint: list[str], timeout: float = 60, mounts: list[Any] | None = None
    ) -> str:
        """Run a client (our image: qemu-io, nbdinfo, ...) in the pod's network namespace to
        its end, which must be exit 0: its output. `mounts`: volumeMounts of the pod's volumes."""
        spec = {"name": f"client-{uuid.uuid4().hex[:4]}", "command": entrypoint}
        return self.run_to_completion({**spec, "volumeMounts": mounts or []}, timeout)

    def run_init_containers(self) -> None:
        for spec in self.spec.get("initContainers", []):
            if spec.get("restartPolicy") == "Always":
                self.start_sidecar(spec)
            else:  # a plain init container runs to completion before the next starts
                self.run_to_completion(spec, timeout=60)

    def run_to_completion(self, spec: dict[str, Any], timeout: float) -> str:
        """Run `spec`'s container until it exits (it must, with 0): its log."""
        import requests

        container = self.run(spec)
        try:
            status = f"exited {container.wait(timeout=timeout)['StatusCode']}"
        except requests.exceptions.RequestException:  # the engine's answer timed out
            status = f"still running after {timeout} s"
        log = container.logs().decode(errors="replace")
        assert status == "exited 0", f"container {spec['name']} {status}; its log:\n{log}"
        return log

    def stop_sidecars(self) -> dict[str, int]:
        """The Job's work done (or the pod deleted), kubelet stops the sidecars (and the
        containers), last started first: exit codes."""
        codes = {}
        for container in reversed(self.sidecars):
            container.stop(timeout=10)
            container.reload()
            name = container.name.removeprefix(f"{self.name}-")
            codes[name] = container.attrs["State"]["ExitCode"]
        return codes

    def remove(self) -> None:
        label = f"io.nbdfabric.test.pod={self.name}"
        found = self.engine.containers.list(all=True, filters={"label": label})
        for c in sorted(found, key=lambda c: c.name.endswith("-pause")):  # the sandbox last
            c.remove(force=True)

    def leftovers(self) -> list[str]:
        label = f"io.nbdfabric.test.pod={self.name}"
        return [c.name for c in self.engine.containers.list(all=True, filters={"label": label})]


def test_k8s_import_job_pod_copies_the_served_image_onto_the_claim(
    engine: Any, image: str, tmp_path: Path
) -> None:
    """compose/k8s-import.yaml with its http source pointed at a server on the pod's loopback:
    `nbdfabric k8s --import-to` gives a Job whose pod, run as a kubelet would, starts its nodes
    as sidecars and leaves on the claim exactly the served image."""
    from orchestrator import k8s

    served = tmp_path / "served"
    served.mkdir(mode=0o755)
    src = random_file(served / "fedora-40.raw", 6 * MiB + 512, seed=6)  # not a whole MiB
    src.chmod(0o644)
    port = 8080  # in the pod's own network namespace: no other listener there
    topo = yaml.safe_load(K8S_IMPORT.read_text())
    topo["nodes"]["source"]["params"]["url"] = f"http://127.0.0.1:{port}/files/{src.name}"
    (tmp_path / "fabric.yaml").write_text(yaml.safe_dump(topo, sort_keys=False))
    out = tmp_path / "import-job.yaml"
    argv = [str(tmp_path / "fabric.yaml"), "--import-to", "vm-disk", "-o", str(out)]
    assert k8s.main(argv) == 0
    (job,) = yaml.safe_load_all(out.read_text())
    spec = job["spec"]["template"]["spec"]
    (importer,) = spec["containers"]

    pod = KubeletPod(engine, image, spec, tmp_path / "pod")
    try:
        pod.start()
        # The image server is no part of the Job (a cluster's is outside the pod): a container
        # of our own on the pod's loopback, serving byte ranges (bench/http_server.py, aiohttp).
        server = engine.containers.run(
            image,
            entrypoint=["python", "/srv/http_server.py", "/srv/images", "--port", str(port)],
            volumes={
                str(HTTP_SERVER): {"bind": "/srv/http_server.py", "mode": "ro"},
                str(served): {"bind": "/srv/images", "mode": "ro"},
            },
            network_mode=f"container:{pod.pause.id}",
            name=f"{pod.name}-http",
            labels=pod.labels,
            detach=True,
        )
        wait_for(lambda: server.logs().strip() or pod.exited(server), 30, "the http server")
        assert server.logs().strip() == str(port).encode(), server.logs().decode()

        pod.run_init_containers()
        log = pod.run_to_completion(importer, timeout=60)
        disk = pod.host_path(importer, importer["args"][-1])
        assert disk.parent == pod.claim_dir("vm-disk"), f"{disk}: not on the claim\n{log}"
        assert sha256_file(disk) == sha256_file(src), (
            f"{disk.name} on the claim ({disk.stat().st_size} bytes) is not the served image "
            f"({src.stat().st_size} bytes); the importer's log:\n{log}"
        )
        # Stopped by SIGTERM through tini, each node exits cleanly.
        assert pod.stop_sidecars() == {"retries": 0, "throttle": 0, "source": 0}
    finally:
        pod.remove()
    assert pod.leftovers() == []


def test_k8s_pod_serves_the_example_fabric_to_clients_in_the_pod(
    engine: Any, image: str, tmp_path: Path
) -> None:
    """`nbdfabric k8s compose/example.yaml`: its pod, run as a kubelet would (every container
    at once: nodes wait for their upstreams), becomes Ready, and a client in the pod's network
    namespace writes and reads the export on its port through delay -> mirror; both members
    hold what was written (read on their unix sockets in the pod's emptyDir)."""
    from orchestrator import k8s
    from orchestrator.topology import load

    pod_doc = k8s.manifests(load(EXAMPLE))[0]
    assert pod_doc["kind"] == "Pod"
    spec = pod_doc["spec"]
    pod = KubeletPod(engine, image, spec, tmp_path / "pod")
    try:
        pod.start()
        pod.start_containers()
        uri = "nbd://127.0.0.1:10809/vm1"
        info = pod.client(["nbdinfo", "--no-content", "--json", uri])  # (the image has no file(1))
        export = json.loads(info)["exports"][0]
        assert (export["export-size"], export["description"]) == (
            256 << 20, "nbdfabric example disk"
        )  # fmt: skip
        pod.client(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x5a 1M 3M",
                    "-c", "read -P 0x5a 1M 3M", "-c", "read -P 0 0 1M"])  # fmt: skip
        run_dir = pod.volumes["run"]  # the emptyDir the nodes' sockets are in
        for member in ("disk-a", "disk-b"):
            h = nbd_connect(f"nbd+unix:///?socket={run_dir}/{member}.sock")
            assert h.pread(3 << 20, 1 << 20) == b"\x5a" * (3 << 20), member
            h.shutdown()
        codes = pod.stop_sidecars()
        assert codes == {c["name"]: 0 for c in spec["containers"]}, codes
    finally:
        pod.remove()
    assert pod.leftovers() == []


TLS_FABRIC = """\
name: sec
nodes:
  disk: {kind: memory, params: {size: 4M}}
exports:
  vm: {node: disk, listen: ["0.0.0.0:10809"], tls: require, tls-certificates: certs}
"""


def test_k8s_pod_serves_a_tls_export_with_the_certificates_of_its_secret(
    engine: Any, image: str, tmp_path: Path
) -> None:
    """An export with `tls: require`: the pod's node serves it with the certificates of a
    Secret (mounted read-only, group-readable by the nodes' fsGroup), which the manifests'
    header says how to make from the topology's directory. A client in the pod with the CA
    reads and writes over nbds://; one without TLS is refused. (The manifests served it in
    plain text before.)"""
    from conftest import make_certificates

    from orchestrator import k8s
    from orchestrator.topology import load

    (tmp_path / "certs").mkdir()
    make_certificates(tmp_path / "certs")
    (tmp_path / "fabric.yaml").write_text(TLS_FABRIC)
    topology = load(tmp_path / "fabric.yaml")
    (command,) = k8s.secret_commands(topology)
    assert command == f"kubectl create secret generic sec-vm-tls --from-file={tmp_path}/certs"
    spec = k8s.manifests(topology)[0]["spec"]
    secrets = {"sec-vm-tls": tmp_path / "certs"}  # as that command makes it
    pod = KubeletPod(engine, image, spec, tmp_path / "pod", secrets)
    try:
        pod.start()
        pod.start_containers()
        ca = [{"name": "tls-vm", "mountPath": "/ca", "readOnly": True}]  # (its ca-cert.pem)
        uri = "nbds://127.0.0.1:10809/vm?tls-certificates=/ca"
        pod.client(["qemu-io", "--image-opts",
                    "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=10809,"
                    "export=vm,tls-creds=tls0", "--object",
                    "tls-creds-x509,id=tls0,dir=/ca,endpoint=client",
                    "-c", "write -P 0x5a 0 1M", "-c", "read -P 0x5a 0 1M"],
                   mounts=ca)  # fmt: skip
        info = pod.client(["nbdinfo", "--no-content", "--json", uri], mounts=ca)
        assert json.loads(info[info.index("{") :])["exports"][0]["export-size"] == 4 << 20, info
        with pytest.raises(AssertionError, match="exited 1"):  # plain text: refused
            pod.client(["nbdinfo", "--json", "nbd://127.0.0.1:10809/vm"])
        codes = pod.stop_sidecars()
        assert codes == {c["name"]: 0 for c in spec["containers"]}, codes
    finally:
        pod.remove()
    assert pod.leftovers() == []
