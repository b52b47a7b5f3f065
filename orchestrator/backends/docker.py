"""The docker backend: every node is a container of the nbdfabric image, started through the
docker SDK on a network of the fabric's own, upstreams first, each one healthy before its
dependents start. Containers and network carry `io.nbdfabric.*` labels, so `status` and `down`
find them from the fabric name alone. Same layout as `nbdfabric compose` (orchestrator/compose.py).

Two ways to use it:
- `DockerBackend` + `DockerNode`: what `nbdfabric up --backend docker` runs under the
  supervisor (orchestrator/supervisor.py), with the same supervision as local processes. Each
  container publishes its gRPC control port on 127.0.0.1 (an ephemeral port) and the supervisor
  watches health through it; containers get docker restart policy `no`, the supervisor restarts
  them per the node's policy with back-off (a restart is a new container: memory nodes come back
  empty and fans rebuild them; a mirror or parity fan keeps its member states on a volume of its
  own, `FABRIC-NODE-state`, removed at down). Container output is copied to RUN/NODE.log.
- `DockerFabric`: a one-shot `up`/`status`/`down` without a supervisor (docker's restart policy
  from the topology does the restarting).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..argv import state_words, uri_path
from ..compose import (
    CONTROL_PORT,
    DEFAULT_IMAGE,
    LABEL_PREFIX,
    NBD_PORT,
    STATE_DIR,
    ContainerLayout,
    Mounts,
    engine_healthcheck,
    labels,
)
from ..plan import start_order, stop_order
from ..topology import Node, Topology
from .process import START_MARK, RunDir, rotate_log
from .process import StartError as ProcessStartError

FABRIC_LABEL = f"{LABEL_PREFIX}.fabric"
RESTART = {"always": "unless-stopped", "never": "no"}


class StartError(ProcessStartError):
    """A container exited or did not become healthy in time."""


@dataclass
class NodeStatus:
    name: str
    kind: str
    state: str  #: the container's: running, exited, restarting, ...
    health: str  #: healthy, unhealthy, starting, none
    container_id: str
    restarts: int
    #: `127.0.0.1:PORT` for an exported node's first published address.
    published: str = ""


def container_name(fabric: str, node: str) -> str:
    return f"{fabric}-{node}"


def network_name(fabric: str) -> str:
    return f"nbdfabric-{fabric}"


def state_volume(fabric: str, node: str) -> str:
    return f"{container_name(fabric, node)}-state"


def make_layout(topology: Topology) -> ContainerLayout:
    hosts = {n: container_name(topology.name, n) for n in topology.nodes}
    return ContainerLayout(topology, hosts, control=True, state_dir=STATE_DIR)


def run_container(
    client: Any,
    image: str,
    topology: Topology,
    layout: ContainerLayout,
    name: str,
    restart: dict[str, Any],
    publish_control: bool = False,
) -> Any:
    """`docker run -d` of one node on the fabric's network, its export's TCP addresses
    published on the host (and its control port on 127.0.0.1 with `publish_control`)."""
    node = topology.nodes[name]
    mounts = Mounts(Path(topology.base_dir))
    command = layout.command(node, mounts)
    ports: dict[str, Any] = {}
    export = topology.export_of(name)
    for addr in export.listen if export else ():
        if not addr.startswith("unix:"):
            host, _, port = addr.rpartition(":")
            ports.setdefault(f"{NBD_PORT}/tcp", []).append(
                (host.strip("[]") or "127.0.0.1", int(port) if port != "0" else None)
            )
    if publish_control:
        ports[f"{CONTROL_PORT}/tcp"] = ("127.0.0.1", None)
    volumes = {
        str(d): {"bind": inside, "mode": "ro" if mounts.read_only[d] else "rw"}
        for d, inside in mounts.dirs.items()
    }
    if layout.state_dir and state_words(node, ""):
        # A new volume takes the image's directory with its owner (the nbdfabric user).
        import docker.errors

        volume = state_volume(topology.name, name)
        try:
            client.volumes.get(volume)
        except docker.errors.NotFound:
            client.volumes.create(volume, labels=labels(topology, node))
        volumes[volume] = {"bind": layout.state_dir, "mode": "rw"}
    return client.containers.run(
        image,
        command,
        name=container_name(topology.name, name),
        hostname=name,
        detach=True,
        labels=labels(topology, node),
        network=network_name(topology.name),
        ports=ports,
        restart_policy=restart,
        environment={"NBDFABRIC_CONTROL": f"127.0.0.1:{CONTROL_PORT}"},
        volumes=volumes,
        healthcheck={"test": layout.healthcheck(), **engine_healthcheck(node)},
    )


def published(container: Any, port: int) -> list[tuple[str, int]]:
    """(host ip, host port) for each host binding of a container port."""
    ports = container.attrs.get("NetworkSettings", {}).get("Ports") or {}
    out = []
    for b in ports.get(f"{port}/tcp") or []:
        if b.get("HostPort"):
            host = b.get("HostIp") or "127.0.0.1"
            out.append(("127.0.0.1" if host == "0.0.0.0" else host, int(b["HostPort"])))
    return out


class DockerNode:
    """One node's container under the supervisor: the same interface as `NodeProcess`
    (spawn, wait_ready, wait_exit, stop, kill, returncode), container id instead of pid."""

    pid = 0

    def __init__(self, backend: DockerBackend, node: Node, topology: Topology) -> None:
        self.backend = backend
        self.node = node
        self.topology = topology
        self.container: Any = None
        self.returncode: int | None = None
        self.info: dict[str, Any] = {}
        self.started_at = 0.0
        self.control = ""
        self._log_thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return container_name(self.topology.name, self.node.name)

    @property
    def container_id(self) -> str:
        return str(self.container.id[:12]) if self.container is not None else ""

    def alive(self) -> bool:
        return self.container is not None and self.returncode is None

    async def spawn(self) -> None:
        import docker.errors

        try:
            self.container = await asyncio.to_thread(self._run)
        except docker.errors.DockerException as exc:
            raise StartError(f"node {self.node.name!r}: docker: {exc}") from None
        self.started_at = time.time()
        self._log_thread = threading.Thread(
            target=self._copy_logs, args=(self.container,), name=f"logs {self.name}", daemon=True
        )
        self._log_thread.start()

    def _run(self) -> Any:
        import docker.errors

        client = self.backend.client
        with contextlib.suppress(docker.errors.NotFound):
            client.containers.get(self.name).remove(force=True)  # left by an earlier run
        return run_container(
            client,
            self.backend.image,
            self.topology,
            make_layout(self.topology),
            self.node.name,
            {"Name": "no"},  # the supervisor restarts, per the node's policy
            publish_control=True,
        )

    def _copy_logs(self, container: Any) -> None:
        """Container output -> RUN/NODE.log, until the container stops."""
        path = self.backend.run.log(self.node.name)
        try:
            rotate_log(path)
            with path.open("ab") as f:
                f.write(f"{START_MARK}container {container.name} {container.id[:12]}\n".encode())
                f.flush()
                for chunk in container.logs(stream=True, follow=True):
                    f.write(chunk)
                    f.flush()
        except Exception:  # the container went away under us: nothing more to copy
            return

    def _refresh(self) -> None:
        import docker.errors

        if self.container is None or self.returncode is not None:
            return
        try:
            self.container.reload()
        except docker.errors.NotFound:
            self.returncode = -1
            return
        state = self.container.attrs["State"]
        if state["Status"] in ("exited", "dead"):
            self.returncode = int(state.get("ExitCode", -1))

    async def wait_ready(self, limit: float) -> dict[str, Any]:
        """Wait until the container runs with its ports published; its URIs on the host."""
        deadline = time.monotonic() + limit
        while True:
            await asyncio.to_thread(self._refresh)
            if self.returncode is not None:
                raise StartError(self.failure(f"exited with status {self.returncode}"))
            c = self.container
            if c.attrs["State"]["Status"] == "running" and published(c, CONTROL_PORT):
                host, port = published(c, CONTROL_PORT)[0]
                self.control = f"{host}:{port}"
                self.info = {"uris": self.host_uris(c), "control": self.control}
                return self.info
            if time.monotonic() > deadline:
                raise StartError(self.failure(f"not running after {limit:.0f}s"))
            await asyncio.sleep(0.05)

    def host_uris(self, container: Any) -> list[str]:
        export = self.topology.export_of(self.node.name)
        if export is None:
            return []
        uris = []
        for addr in export.listen:
            if addr.startswith("unix:"):
                uris.append(f"nbd+unix:///{uri_path(export.served_name)}?socket={addr[5:]}")
        for host, port in published(container, NBD_PORT):
            host = f"[{host}]" if ":" in host else host
            uris.append(f"nbd://{host}:{port}/{uri_path(export.served_name)}")
        return uris

    async def wait_exit(self, limit: float) -> None:
        await asyncio.sleep(limit)
        await asyncio.to_thread(self._refresh)

    def failure(self, what: str) -> str:
        tail = ""
        if self.container is not None:
            with contextlib.suppress(Exception):
                tail = self.container.logs(tail=15).decode(errors="replace").rstrip()
        return f"node {self.node.name!r} (container {self.name}) {what}" + (
            f"; its output:\n{tail}" if tail else ""
        )

    async def stop(self, grace: float = 10.0) -> int | None:
        """docker stop (SIGTERM, SIGKILL after `grace`), then remove the container."""
        await asyncio.to_thread(self._stop, grace)
        return self.returncode

    def _stop(self, grace: float) -> None:
        import docker.errors

        c = self.container
        if c is None:
            return
        with contextlib.suppress(docker.errors.NotFound):
            if self.returncode is None:
                c.stop(timeout=int(grace))
                self._refresh()
            c.remove(force=True)
        if self.returncode is None:
            self.returncode = -1

    async def kill(self) -> None:
        await asyncio.to_thread(self._kill)

    def _kill(self) -> None:
        import docker.errors

        if self.container is not None:
            with contextlib.suppress(docker.errors.NotFound):
                self.container.remove(force=True)
        if self.returncode is None:
            self.returncode = -9


class DockerBackend:
    """Nodes as containers of `image` on the network `nbdfabric-FABRIC`."""

    name = "docker"

    def __init__(self, run: RunDir, image: str | None = None, client: Any = None) -> None:
        if client is None:
            import docker

            client = docker.from_env()
        self.client = client
        self.run = run
        self.image = image or os.environ.get("NBDFABRIC_IMAGE") or DEFAULT_IMAGE
        self._fabric = ""  #: set by prepare()

    def new_node(self, node: Node, topology: Topology) -> DockerNode:
        return DockerNode(self, node, topology)

    def internal_uri(self, topology: Topology, node: str) -> str:
        return make_layout(topology).upstream_uri(node)

    def forget_state(self, node: str) -> None:
        """The node's state volume goes (with the stopped container that holds it)."""
        import docker.errors

        fabric = self._fabric
        with contextlib.suppress(docker.errors.NotFound):
            self.client.containers.get(container_name(fabric, node)).remove(force=True)
        with contextlib.suppress(docker.errors.NotFound):
            self.client.volumes.get(state_volume(fabric, node)).remove(force=True)

    async def prepare(self, topology: Topology) -> None:
        """The image must be here (no registry is asked) and the network exists."""
        import docker.errors

        self._fabric = topology.name

        def work() -> None:
            try:
                self.client.images.get(self.image)
            except docker.errors.ImageNotFound:
                raise RuntimeError(
                    f"image {self.image} not found; build it with scripts/build-image.sh"
                ) from None
            DockerFabric(self.client, self.image).network(topology.name)

        await asyncio.to_thread(work)

    async def teardown(self, fabric: str) -> None:
        """Whatever containers are left for the fabric, and its network."""
        await asyncio.to_thread(DockerFabric(self.client, self.image).down, fabric)

    def probe(self, handle: DockerNode) -> bool:
        return handle.alive()


class DockerFabric:
    def __init__(self, client: Any = None, image: str = DEFAULT_IMAGE) -> None:
        if client is None:
            import docker

            client = docker.from_env()
        self.client = client
        self.image = image

    # -- up --------------------------------------------------------------------------------------

    def up(self, topology: Topology, timeout: float = 60) -> dict[str, str]:
        """Start every node (upstreams first, each healthy before the next level); returns the
        export URIs on the host. Containers already running for this fabric are kept."""
        fabric = topology.name
        self.network(fabric)
        layout = ContainerLayout(
            topology, {n: container_name(fabric, n) for n in topology.nodes}, control=True
        )
        for name in start_order(topology):
            container = self.find(fabric, name)
            if container is None or container.status != "running":
                if container is not None:
                    container.remove(force=True)
                container = self.run_node(topology, layout, name)
            self.wait_healthy(container, timeout)
        return self.export_uris(topology)

    def network(self, fabric: str) -> Any:
        found = self.client.networks.list(names=[network_name(fabric)])
        if found:
            return found[0]
        return self.client.networks.create(
            network_name(fabric), driver="bridge", labels={FABRIC_LABEL: fabric}
        )

    def run_node(self, topology: Topology, layout: ContainerLayout, name: str) -> Any:
        node = topology.nodes[name]
        restart = (
            {"Name": "on-failure", "MaximumRetryCount": node.max_restarts}
            if node.restart == "on-failure"
            else {"Name": RESTART[node.restart]}
        )
        return run_container(self.client, self.image, topology, layout, name, restart)

    def wait_healthy(self, container: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            container.reload()
            state = container.attrs["State"]
            if state["Status"] in ("exited", "dead"):
                logs = container.logs(tail=15).decode(errors="replace")
                raise StartError(f"{container.name} exited {state['ExitCode']}:\n{logs}")
            if state.get("Health", {}).get("Status") == "healthy":
                return
            if time.monotonic() > deadline:
                raise StartError(f"{container.name} not healthy after {timeout:.0f}s")
            time.sleep(0.2)

    # -- status and down ---------------------------------------------------------------------

    def containers(self, fabric: str) -> list[Any]:
        return list(
            self.client.containers.list(all=True, filters={"label": f"{FABRIC_LABEL}={fabric}"})
        )

    def find(self, fabric: str, node: str) -> Any:
        for c in self.containers(fabric):
            if c.labels.get(f"{LABEL_PREFIX}.node") == node:
                return c
        return None

    def status(self, fabric: str) -> list[NodeStatus]:
        out = []
        for c in self.containers(fabric):
            state = c.attrs["State"]
            published = ""
            for bindings in (c.attrs["NetworkSettings"].get("Ports") or {}).values():
                if bindings:
                    published = f"{bindings[0]['HostIp']}:{bindings[0]['HostPort']}"
                    break
            out.append(
                NodeStatus(
                    name=c.labels.get(f"{LABEL_PREFIX}.node", c.name),
                    kind=c.labels.get(f"{LABEL_PREFIX}.kind", ""),
                    state=state["Status"],
                    health=state.get("Health", {}).get("Status", "none"),
                    container_id=c.id[:12],
                    restarts=int(c.attrs.get("RestartCount", 0)),
                    published=published,
                )
            )
        return sorted(out, key=lambda s: s.name)

    def export_uris(self, topology: Topology) -> dict[str, str]:
        by_node = {s.name: s for s in self.status(topology.name)}
        uris = {}
        for export in topology.exports.values():
            st = by_node.get(export.node)
            if st is not None and st.published:
                host, _, port = st.published.rpartition(":")
                host = "127.0.0.1" if host in ("0.0.0.0", "") else host
                uris[export.name] = f"nbd://{host}:{port}/{uri_path(export.served_name)}"
        return uris

    def down(self, fabric: str, topology: Topology | None = None, grace: int = 10) -> None:
        """Stop dependents before upstreams (when the topology is known), remove all, then
        the network."""
        containers = {
            c.labels.get(f"{LABEL_PREFIX}.node", c.name): c for c in self.containers(fabric)
        }
        order = stop_order(topology) if topology else []
        for name in [*order, *(n for n in containers if n not in order)]:
            c = containers.get(name)
            if c is not None:
                if c.status == "running":
                    c.stop(timeout=grace)
                c.remove(force=True)
        for net in self.client.networks.list(filters={"label": f"{FABRIC_LABEL}={fabric}"}):
            net.remove()
        for volume in self.client.volumes.list(filters={"label": f"{FABRIC_LABEL}={fabric}"}):
            volume.remove(force=True)
