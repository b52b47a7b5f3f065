"""The docker backend: every node is a container of the nbdfabric image, started through the
docker SDK on a network of the fabric's own, upstreams first, each one healthy before its
dependents start. Containers and network carry `io.nbdfabric.*` labels, so `status` and `down`
find them from the fabric name alone. Same layout as `nbdfabric compose` (orchestrator/compose.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..compose import (
    DEFAULT_IMAGE,
    LABEL_PREFIX,
    NBD_PORT,
    ContainerLayout,
    Mounts,
    labels,
)
from ..plan import start_order, stop_order
from ..topology import Topology

FABRIC_LABEL = f"{LABEL_PREFIX}.fabric"
RESTART = {"always": "unless-stopped", "never": "no"}


class StartError(RuntimeError):
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
        mounts = Mounts(Path(topology.base_dir))
        command = layout.command(node, mounts)
        restart = (
            {"Name": "on-failure", "MaximumRetryCount": node.max_restarts}
            if node.restart == "on-failure"
            else {"Name": RESTART[node.restart]}
        )
        ports: dict[str, Any] = {}
        export = topology.export_of(name)
        for addr in export.listen if export else ():
            if not addr.startswith("unix:"):
                host, _, port = addr.rpartition(":")
                ports.setdefault(f"{NBD_PORT}/tcp", []).append(
                    (host or "127.0.0.1", int(port) if port != "0" else None)
                )
        health_cmd = layout.healthcheck()
        return self.client.containers.run(
            self.image,
            command,
            name=container_name(topology.name, name),
            hostname=name,
            detach=True,
            labels=labels(topology, node),
            network=network_name(topology.name),
            ports=ports,
            restart_policy=restart,
            environment={"NBDFABRIC_CONTROL": "127.0.0.1:10810"},
            volumes={
                str(d): {"bind": inside, "mode": "ro" if mounts.read_only[d] else "rw"}
                for d, inside in mounts.dirs.items()
            },
            healthcheck={
                "test": health_cmd,
                "interval": 1_000_000_000,
                "timeout": 3_000_000_000,
                "retries": 5,
                "start_period": 10_000_000_000,
            },
        )

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
                uris[export.name] = f"nbd://{host}:{port}/{export.name}"
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
