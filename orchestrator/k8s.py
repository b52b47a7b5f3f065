"""`nbdfabric k8s FILE`: a topology as Kubernetes manifests (generation only).

The fabric is one Pod: a container per node, all sharing an emptyDir at /run/nbdfabric for
their unix sockets (`NODE.sock` for NBD, `NODE.ctl` for gRPC control + health, which the probes
ask with `nbdfabric health`). Exports with TCP addresses also listen on the pod's network and
get a Service. With `--import-to PVC`, the output is instead a Job in the style of KubeVirt's
CDI importer: the node containers run as native sidecars (init containers with
`restartPolicy: Always`, Kubernetes >= 1.29) and a main container copies the export onto the
claim with qemu-img; the Job completes when the copy does.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
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
from .compose import DEFAULT_IMAGE, LABEL_PREFIX
from .names import is_uri, node_ref
from .topology import HealthTimes, Node, Topology, load_or_report

RUN_DIR = "/run/nbdfabric"
DATA_ROOT = "/mnt/nbdfabric"
TARGET_DIR = "/target"
#: Where an export's TLS files are, from the Secret named by tls_secret().
TLS_ROOT = "/etc/nbdfabric/tls"
USER_ID = 10809
#: The probes' timings where a node's `healthcheck:` says nothing: readiness and liveness
#: every `interval`, the container restarted after `retries` failed liveness probes, a start
#: given `start_period` (a startup probe every second). `grace` is the supervisor's alone.
PROBES = HealthTimes(interval=5.0, timeout=3.0, retries=3, start_period=60.0, grace=0)


def k8s_name(text: str) -> str:
    """A DNS-1123 label from a node or fabric name (`disk_A.1` -> `disk-a-1`)."""
    name = re.sub(r"[^a-z0-9-]", "-", text.lower()).strip("-")
    return name[:63] or "node"


def _sock(node: str) -> str:
    return f"{RUN_DIR}/{node}.sock"


def _ctl(node: str) -> str:
    return f"unix:{RUN_DIR}/{node}.ctl"


def _uri(topology: Topology, node: str, name: str | None = None) -> str:
    """Export `name` of `node` on its socket; None: the node's own (as `exports:` names it)."""
    if name is None:
        export = topology.export_of(node)
        name = export.served_name if export else ""
    return f"nbd+unix:///{uri_path(name)}?socket={_sock(node)}"


def _upstream_uri(topology: Topology, upstream: str) -> str:
    return upstream if is_uri(upstream) else _uri(topology, *node_ref(upstream))


def _tcp_ports(topology: Topology, node: str) -> list[int]:
    export = topology.export_of(node)
    ports = []
    for addr in export.listen if export else ():
        if not addr.startswith("unix:"):
            port = int(addr.rpartition(":")[2])
            ports.append(port or 10809)
    return sorted(set(ports))


class _Volumes:
    """Host paths named by params become hostPath volumes (swap in PVCs for real clusters)."""

    def __init__(self, base_dir: str) -> None:
        self.base_dir = Path(base_dir)
        self.dirs: dict[str, str] = {}
        #: volume name -> Secret name: an export's TLS files.
        self.secrets: dict[str, str] = {}

    def map_file(self, text: str) -> str:
        p = Path(text)
        host = str((self.base_dir / p.parent).resolve())
        if host not in self.dirs:
            self.dirs[host] = f"data-{len(self.dirs)}"
        return str(PurePosixPath(DATA_ROOT, self.dirs[host], p.name))


def node_container(
    topology: Topology, node: Node, image: str, volumes: _Volumes, tcp: bool = True
) -> dict[str, Any]:
    """The container of one node; without `tcp`, its export is on its unix socket only."""
    ports = _tcp_ports(topology, node.name) if tcp else []
    args = ["node", node.kind, *param_words(node, volumes.map_file), *option_words(node)]
    # In the pod's emptyDir: it outlives a restart of the container, not the pod.
    args += state_words(node, f"{RUN_DIR}/{node.name}.state")
    args += ["--name", node.name, "--listen", f"unix:{_sock(node.name)}"]
    for port in ports:
        args += ["--listen", f"0.0.0.0:{port}"]
    for up in node.upstreams:
        args += ["--upstream", _upstream_uri(topology, up)]
    export = topology.export_of(node.name)
    tls_mounts: list[dict[str, Any]] = []
    if export is not None:
        # Its TLS files come from a Secret (tls_secret), mounted read-only. Served on its
        # unix socket only (an import Job's), an export needs none: nobody else reaches it.
        tls = tcp and export.tls != "off"
        secret_dir = f"{TLS_ROOT}/{k8s_name(export.name)}"
        args += export_words(
            export,
            tls=tls,
            map_dir=lambda _: secret_dir,
            map_secret=lambda path: f"{secret_dir}/{PurePosixPath(path).name}",
        )
        if tls:
            volume = k8s_name(f"tls-{export.name}")
            volumes.secrets[volume] = tls_secret(topology, export.name)
            tls_mounts.append({"name": volume, "mountPath": secret_dir, "readOnly": True})
    args += ["--control", _ctl(node.name)]
    watch = node.healthcheck.over(PROBES)
    probe = {
        "exec": {"command": ["nbdfabric", "health", "-q", _ctl(node.name)]},
        "periodSeconds": _whole_seconds(watch.interval),
        "timeoutSeconds": _whole_seconds(watch.timeout),
    }
    mounts: list[dict[str, Any]] = [{"name": "run", "mountPath": RUN_DIR}]
    mounts += [
        {"name": vol, "mountPath": f"{DATA_ROOT}/{vol}"} for vol in sorted(volumes.dirs.values())
    ]
    mounts += tls_mounts
    container: dict[str, Any] = {
        "name": k8s_name(node.name),
        "image": image,
        "args": args,
        "volumeMounts": mounts,
        "startupProbe": {
            **probe,
            "periodSeconds": 1,
            "failureThreshold": _whole_seconds(watch.start_period),
        },
        "readinessProbe": probe,
        "livenessProbe": {**probe, "failureThreshold": watch.retries},
    }
    if ports:
        container["ports"] = [{"name": f"nbd-{i}", "containerPort": p} for i, p in enumerate(ports)]
    return container


def _whole_seconds(seconds: float) -> int:
    """A probe's seconds are whole, at least 1."""
    return max(1, math.ceil(seconds))


def _labels(topology: Topology) -> dict[str, str]:
    return {f"{LABEL_PREFIX}/fabric": k8s_name(topology.name)}


def pod_spec(
    topology: Topology, image: str, tcp: bool = True
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(pod spec, node containers); the volumes of every node are gathered on the pod. Without
    `tcp` the exports listen on their unix sockets in the pod only."""
    containers = []
    all_dirs: dict[str, str] = {}
    secrets: dict[str, str] = {}
    for node in topology.nodes.values():
        volumes = _Volumes(topology.base_dir)
        volumes.dirs = all_dirs  # one volume per host directory across the pod
        volumes.secrets = secrets
        containers.append(node_container(topology, node, image, volumes, tcp))
    spec: dict[str, Any] = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": USER_ID, "fsGroup": USER_ID},
        "containers": containers,
        "volumes": [{"name": "run", "emptyDir": {"medium": "Memory"}}]
        + [
            {"name": vol, "hostPath": {"path": host, "type": "DirectoryOrCreate"}}
            for host, vol in all_dirs.items()
        ]
        # Group-readable: the nodes run as USER_ID, in fsGroup USER_ID, the files' group.
        + [
            {"name": vol, "secret": {"secretName": name, "defaultMode": 0o440}}
            for vol, name in secrets.items()
        ],
    }
    return spec, containers


def manifests(topology: Topology, image: str = DEFAULT_IMAGE) -> list[dict[str, Any]]:
    name = k8s_name(topology.name)
    spec, _ = pod_spec(topology, image)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": _labels(topology)},
        "spec": spec,
    }
    out: list[dict[str, Any]] = [pod]
    ports = [
        {"name": k8s_name(f"{e.name}-{p}")[:15], "port": p, "targetPort": p}
        for e in topology.exports.values()
        for p in _tcp_ports(topology, e.node)
    ]
    if ports:
        out.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "labels": _labels(topology)},
                "spec": {"selector": _labels(topology), "ports": ports},
            }
        )
    return out


def import_job(
    topology: Topology, export: str, claim: str, image: str = DEFAULT_IMAGE, fmt: str = "raw"
) -> dict[str, Any]:
    """A Job copying `export` onto the PVC `claim` (as `disk.img`), CDI importer style."""
    if export not in topology.exports:
        raise ValueError(f"no export {export!r} (exports: {', '.join(topology.exports)})")
    # An exportname node's default export ("") is one disk; a directory has none to import.
    if topology.exports[export].multi_export == "directory":
        raise ValueError(
            f"export {export!r} serves a directory, one export per file: to import one file, "
            "export a filter over it (upstream: NODE/FILE) and import that"
        )
    # The importer reads the unix socket: the disk is not offered on the pod network, where
    # any pod of the cluster could read it (or write it) while it is imported.
    spec, containers = pod_spec(topology, image, tcp=False)
    for c in containers:
        c["restartPolicy"] = "Always"  # native sidecar: started in order, stopped after the job
        c.pop("livenessProbe")
        c.pop("readinessProbe")
    node = topology.exports[export].node
    importer = {
        "name": "importer",
        "image": image,
        "command": ["qemu-img"],
        "args": [
            "convert",
            "-p",
            "-O",
            fmt,
            _uri(topology, node),
            f"{TARGET_DIR}/disk.img",
        ],
        "volumeMounts": [
            {"name": "run", "mountPath": RUN_DIR},
            {"name": "target", "mountPath": TARGET_DIR},
        ],
    }
    spec["initContainers"] = containers
    spec["containers"] = [importer]
    spec["restartPolicy"] = "Never"
    spec["volumes"].append({"name": "target", "persistentVolumeClaim": {"claimName": claim}})
    name = k8s_name(f"{topology.name}-import")
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": _labels(topology)},
        "spec": {
            "backoffLimit": 2,
            "template": {"metadata": {"labels": _labels(topology)}, "spec": spec},
        },
    }


def tls_secret(topology: Topology, export: str) -> str:
    """The Secret holding an export's TLS files (not generated: keys do not belong in
    printed manifests; `secret_commands` says how to make it)."""
    return k8s_name(f"{topology.name}-{export}-tls")


def secret_commands(topology: Topology) -> list[str]:
    """`kubectl create secret` for each Secret the manifests mount, from the files the
    topology names (as `nbdfabric up` would read them)."""
    commands = []
    for export in topology.exports.values():
        if export.tls == "off":
            continue
        files = []
        if export.tls_certificates:  # each file of it a key
            files.append(
                f"--from-file={Path(topology.base_dir, export.tls_certificates).resolve()}"
            )
        if export.tls_psk:
            files.append(f"--from-file={Path(topology.base_dir, export.tls_psk).resolve()}")
        secret = tls_secret(topology, export.name)
        commands.append(f"kubectl create secret generic {secret} {' '.join(files)}")
    return commands


def render(docs: list[dict[str, Any]], source: str, commands: Sequence[str] = ()) -> str:
    header = f"# Generated by `nbdfabric k8s {source}`: edit the topology, not this file.\n"
    if commands:
        header += "# The pod mounts Secrets with the exports' TLS files; make them first:\n"
        header += "".join(f"#   {c}\n" for c in commands)
    return header + yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False, width=100)


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="nbdfabric k8s", description="Print Kubernetes manifests that run the topology."
    )
    p.add_argument("file", help="topology file")
    p.add_argument("--image", default=DEFAULT_IMAGE, help=f"image (default: {DEFAULT_IMAGE})")
    p.add_argument("--import-to", metavar="PVC", help="emit a Job copying an export onto PVC")
    p.add_argument("--export", help="the export to import (default: the only one)")
    p.add_argument("--format", default="raw", help="qemu-img output format (default: raw)")
    p.add_argument("-o", "--output", metavar="OUT", help="write here instead of stdout")
    args = p.parse_args(argv)
    topology = load_or_report(args.file)
    if topology is None:
        return 1
    for warning in secrets_in_clear(topology):
        print(f"nbdfabric k8s: warning: {warning}", file=sys.stderr)
    if args.import_to:
        export = args.export or (next(iter(topology.exports)) if topology.exports else "")
        if args.export is None and len(topology.exports) != 1:
            print("nbdfabric k8s: --import-to needs --export NAME", file=sys.stderr)
            return 1
        try:
            docs = [import_job(topology, export, args.import_to, args.image, args.format)]
        except ValueError as exc:
            print(f"nbdfabric k8s: {exc}", file=sys.stderr)
            return 1
    else:
        docs = manifests(topology, args.image)
    text = render(docs, args.file, () if args.import_to else secret_commands(topology))
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0
