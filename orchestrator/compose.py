"""`nbdfabric compose FILE`: a topology as a docker compose file (format 2.4, which both
docker-compose v1 and `docker compose` read, with `depends_on: condition: service_healthy`).

One service per node, all from one image (compose/Dockerfile, built by scripts/build-image.sh).
Inside its container every node serves NBD on 0.0.0.0:10809 and gRPC control + health on
0.0.0.0:10810; upstreams are `nbd://SERVICE:10809/EXPORT` over the compose network. Exports
are published on the host at the topology's TCP addresses (127.0.0.1 unless a host is
given), unix-socket exports and file params become bind mounts of their directories.
The layout helpers here (`ContainerLayout`, `container_command`) serve the docker backend too.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from .argv import (
    export_words,
    option_words,
    param_words,
    secrets_in_clear,
    state_words,
    uri_path,
)
from .names import is_uri, node_ref
from .topology import HealthTimes, Node, Topology, load_or_report

#: The image every node container runs; `${NBDFABRIC_IMAGE}` overrides it when compose runs.
DEFAULT_IMAGE = "nbdfabric:latest"
NBD_PORT = 10809
CONTROL_PORT = 10810
#: In the image: the nbdfabric user's home, where a node that keeps state across restarts (a
#: mirror's bitmap-file) keeps it. In a compose service, in the container itself: docker's
#: restart policy restarts the same container, and a recreated one is another array's.
STATE_DIR = "/var/lib/nbdfabric"
#: Where bind-mounted host directories appear inside a container.
MOUNT_ROOT = "/mnt/nbdfabric"
LABEL_PREFIX = "io.nbdfabric"
RESTART = {"always": "unless-stopped", "never": "no"}
#: The engine's health check of a node's container where its `healthcheck:` says nothing
#: (a compose file's; the docker backend checks every second, as its supervisor reads it).
#: `grace` is the supervisor's alone: the engine only marks a container unhealthy.
COMPOSE_HEALTH = HealthTimes(interval=2.0, timeout=3.0, retries=5, start_period=10.0, grace=0)
ENGINE_HEALTH = COMPOSE_HEALTH._replace(interval=1.0)


@dataclass
class Mounts:
    """Host directories a node needs, each mounted once under MOUNT_ROOT."""

    base_dir: Path
    dirs: dict[Path, str] = field(default_factory=dict)
    read_only: dict[Path, bool] = field(default_factory=dict)

    def map_dir(self, host_dir: Path, read_only: bool = False) -> str:
        host_dir = (self.base_dir / host_dir).resolve()
        if host_dir not in self.dirs:
            self.dirs[host_dir] = f"{MOUNT_ROOT}/{len(self.dirs)}"
            self.read_only[host_dir] = read_only
        else:
            self.read_only[host_dir] = self.read_only[host_dir] and read_only
        return self.dirs[host_dir]

    def map_file(self, host_path: str, read_only: bool = False) -> str:
        p = Path(host_path)
        return str(PurePosixPath(self.map_dir(p.parent, read_only)) / p.name)


@dataclass(frozen=True)
class ContainerLayout:
    """How a topology maps onto containers: names, addresses and command lines."""

    topology: Topology
    #: How a node reaches another node's container (service name or container name).
    hosts: dict[str, str]
    control: bool = True
    #: Where a node that keeps state across restarts (a mirror, parity) keeps it (STATE_DIR;
    #: the docker backend puts a volume of its own there); None: nowhere.
    state_dir: str | None = None

    def export_name(self, node: str) -> str:
        export = self.topology.export_of(node)
        return export.served_name if export else ""

    def upstream_uri(self, up: str) -> str:
        """`NODE`: the node's export (named as in `exports:`); `NODE/EXPORT`: that one."""
        if is_uri(up):
            return up
        ref = node_ref(up)
        export = self.export_name(ref.node) if ref.export is None else ref.export
        return f"nbd://{self.hosts[ref.node]}:{NBD_PORT}/{uri_path(export)}"

    def command(self, node: Node, mounts: Mounts) -> list[str]:
        """The arguments after the image's entrypoint (`nbdfabric`)."""
        cmd = ["node", node.kind, *param_words(node, mounts.map_file), *option_words(node)]
        if self.state_dir:
            cmd += state_words(node, f"{self.state_dir}/{node.name}.state")
        cmd += ["--name", node.name, "--listen", f"0.0.0.0:{NBD_PORT}"]
        for up in node.upstreams:
            cmd += ["--upstream", self.upstream_uri(up)]
        export = self.topology.export_of(node.name)
        if export is not None:
            for addr in export.listen:
                if addr.startswith("unix:"):
                    cmd += ["--listen", f"unix:{mounts.map_file(addr[5:])}"]
            cmd += export_words(
                export,
                map_dir=lambda d: mounts.map_dir(Path(d), read_only=True),
                map_secret=lambda f: mounts.map_file(f, read_only=True),
            )
        if self.control:
            cmd += ["--control", f"0.0.0.0:{CONTROL_PORT}"]
        return cmd

    def healthcheck(self) -> list[str]:
        if self.control:
            return ["CMD", "nbdfabric", "health", "-q", f"127.0.0.1:{CONTROL_PORT}"]
        return ["CMD", "python", "/opt/nbdfabric/healthcheck.py"]


def published_ports(topology: Topology, node: str) -> list[str]:
    """`HOST:PORT:10809` for every TCP listen address of the node's export."""
    export = topology.export_of(node)
    out = []
    for addr in export.listen if export else ():
        if addr.startswith("unix:"):
            continue
        host, _, port = addr.rpartition(":")
        host = host or "127.0.0.1"
        out.append(f"{host}:{'' if port == '0' else port}:{NBD_PORT}")
    return out


def labels(topology: Topology, node: Node) -> dict[str, str]:
    out = {
        f"{LABEL_PREFIX}.fabric": topology.name,
        f"{LABEL_PREFIX}.node": node.name,
        f"{LABEL_PREFIX}.kind": node.kind,
        f"{LABEL_PREFIX}.role": node.role,
    }
    export = topology.export_of(node.name)
    if export is not None:
        out[f"{LABEL_PREFIX}.export"] = export.name
    return out


def compose_healthcheck(node: Node) -> dict[str, Any]:
    """The timings of a compose service's `healthcheck:` (durations as compose writes them)."""
    return _health_timings(node.healthcheck.over(COMPOSE_HEALTH), _compose_duration)


def engine_healthcheck(node: Node) -> dict[str, Any]:
    """The same for the engine's API (durations in nanoseconds)."""
    return _health_timings(node.healthcheck.over(ENGINE_HEALTH), lambda s: round(s * 1e9))


def _health_timings(watch: HealthTimes, duration: Callable[[float], Any]) -> dict[str, Any]:
    return {
        "interval": duration(watch.interval),
        "timeout": duration(watch.timeout),
        "retries": watch.retries,
        "start_period": duration(watch.start_period),
    }


def _compose_duration(seconds: float) -> str:
    """`2s`, `1500ms`, `250us`: the engine takes at least 1ms (under it, compose refuses)."""
    us = max(round(seconds * 1e6), 1000)
    if us % 1_000_000 == 0:
        return f"{us // 1_000_000}s"
    return f"{us // 1000}ms" if us % 1000 == 0 else f"{us}us"


def restart_policy(node: Node) -> str:
    if node.restart == "on-failure":
        return f"on-failure:{node.max_restarts}" if node.max_restarts else "on-failure"
    return RESTART[node.restart]


def compose_dict(
    topology: Topology,
    image: str = f"${{NBDFABRIC_IMAGE:-{DEFAULT_IMAGE}}}",
    relative_to: Path | None = None,
    control: bool = True,
) -> dict[str, Any]:
    """The compose file as a mapping. Host paths are written relative to `relative_to` (the
    compose file's directory, from which compose resolves them) when they are below it."""
    layout = ContainerLayout(topology, {n: n for n in topology.nodes}, control, STATE_DIR)
    services: dict[str, Any] = {}
    for node in topology.nodes.values():
        mounts = Mounts(Path(topology.base_dir))
        service: dict[str, Any] = {
            "image": image,
            "command": layout.command(node, mounts),
            "restart": restart_policy(node),
            "labels": labels(topology, node),
            "healthcheck": {"test": layout.healthcheck(), **compose_healthcheck(node)},
            "stop_grace_period": "10s",
        }
        if control:
            service["environment"] = {"NBDFABRIC_CONTROL": f"127.0.0.1:{CONTROL_PORT}"}
        ups = node.node_upstreams()
        if ups:
            service["depends_on"] = {u: {"condition": "service_healthy"} for u in ups}
        ports = published_ports(topology, node.name)
        if ports:
            service["ports"] = ports
        if mounts.dirs:
            service["volumes"] = [
                f"{_host_path(d, relative_to)}:{inside}{':ro' if mounts.read_only[d] else ''}"
                for d, inside in mounts.dirs.items()
            ]
        services[node.name] = service
    return {
        "version": "2.4",
        "services": services,
        "networks": {"default": {"labels": {f"{LABEL_PREFIX}.fabric": topology.name}}},
    }


def _host_path(path: Path, relative_to: Path | None) -> str:
    if relative_to is not None:
        try:
            rel = path.relative_to(relative_to.resolve())
        except ValueError:
            return str(path)
        return f"./{rel}" if str(rel) != "." else "."
    return str(path)


def render(
    topology: Topology, source: str, relative_to: Path | None = None, image: str | None = None
) -> str:
    data = (
        compose_dict(topology, image=image, relative_to=relative_to)
        if image
        else compose_dict(topology, relative_to=relative_to)
    )
    header = (
        f"# Generated by `nbdfabric compose {source}` from fabric {topology.name!r}: edit the\n"
        "# topology, not this file. Build the image first: scripts/build-image.sh\n"
    )
    return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=100)


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="nbdfabric compose",
        description="Print a docker compose file (format 2.4) that runs the topology.",
    )
    p.add_argument("file", help="topology file")
    p.add_argument("-o", "--output", metavar="OUT", help="write here instead of stdout")
    p.add_argument("--image", help=f"image for every node (default: {DEFAULT_IMAGE})")
    p.add_argument(
        "--check", action="store_true", help="exit 1 when OUT differs from what would be written"
    )
    args = p.parse_args(argv)
    topology = load_or_report(args.file)
    if topology is None:
        return 1
    for warning in secrets_in_clear(topology):
        print(f"nbdfabric compose: warning: {warning}", file=sys.stderr)
    out = Path(args.output) if args.output else None
    base = (out.parent if out else Path.cwd()).resolve()
    source = _relative_source(Path(args.file), base)
    text = render(topology, source, base, args.image)
    if out is None:
        sys.stdout.write(text)
        return 0
    if args.check:
        current = out.read_text() if out.exists() else ""
        if current != text:
            print(
                f"nbdfabric compose: {out} is stale; run `nbdfabric compose {args.file} -o {out}`",
                file=sys.stderr,
            )
            return 1
        return 0
    out.write_text(text)
    return 0


def _relative_source(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base))
    except ValueError:
        return str(path)
