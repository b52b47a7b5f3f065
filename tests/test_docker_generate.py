"""Compose and Kubernetes generation from topologies: structure and YAML validity (no engine)."""

from __future__ import annotations

from pathlib import Path

import yaml
from conftest import ROOT

from orchestrator import compose, k8s
from orchestrator.topology import load, load_text

EXAMPLE = ROOT / "compose" / "example.yaml"
IMPORT = ROOT / "compose" / "k8s-import.yaml"

FILE_TOPOLOGY = """
name: files
nodes:
  disk: {kind: memory, params: {size: 1M}}
  flaky: {kind: error, upstream: disk, params: {error-file: triggers/fail, error-rate: 1}}
  m: {kind: mirror, upstreams: [flaky, disk], params: {bitmap-file: /var/lib/nbd/m.bitmap}}
exports:
  e: {node: m, listen: ["0.0.0.0:10900", "127.0.0.1:0", "unix:/run/x/e.sock"]}
"""


def test_compose_services_upstreams_and_health() -> None:
    data = compose.compose_dict(load(EXAMPLE))
    assert data["version"] == "2.4"
    mirror = data["services"]["mirror"]
    assert mirror["command"][:2] == ["node", "mirror"]
    ups = [mirror["command"][i + 1] for i, a in enumerate(mirror["command"]) if a == "--upstream"]
    assert ups == ["nbd://disk-a:10809/", "nbd://disk-b:10809/"]
    assert mirror["depends_on"] == {
        "disk-a": {"condition": "service_healthy"},
        "disk-b": {"condition": "service_healthy"},
    }
    assert mirror["healthcheck"]["test"][:3] == ["CMD", "nbdfabric", "health"]
    assert mirror["restart"] == "unless-stopped"
    assert mirror["labels"]["io.nbdfabric.fabric"] == "example"
    # Kept in the container: docker's restart policy restarts the same one.
    assert "bitmap-file=/var/lib/nbdfabric/mirror.state" in mirror["command"]
    assert not any("-file=" in a for a in data["services"]["slow"]["command"])


def test_compose_ports_default_to_loopback_and_files_become_volumes(tmp_path: Path) -> None:
    topo = load_text(FILE_TOPOLOGY, str(tmp_path / "fabric.yaml"))
    data = compose.compose_dict(topo, relative_to=tmp_path)
    m = data["services"]["m"]
    assert m["ports"] == ["0.0.0.0:10900:10809", "127.0.0.1::10809"]
    assert "/var/lib/nbd:/mnt/nbdfabric/0" in m["volumes"]
    assert "/run/x:/mnt/nbdfabric/1" in m["volumes"]
    assert "bitmap-file=/mnt/nbdfabric/0/m.bitmap" in m["command"]
    assert "unix:/mnt/nbdfabric/1/e.sock" in m["command"]
    flaky = data["services"]["flaky"]
    assert flaky["volumes"] == ["./triggers:/mnt/nbdfabric/0"]
    assert "error-file=/mnt/nbdfabric/0/fail" in flaky["command"]
    assert "ports" not in flaky


def test_compose_restart_policies() -> None:
    text = (
        EXAMPLE.read_text()
        .replace(
            "disk-a: {kind: memory, params: {size: 256M}}",
            "disk-a: {kind: memory, params: {size: 256M}, restart: on-failure, max-restarts: 3}",
        )
        .replace(
            "disk-b: {kind: memory, params: {size: 256M}}",
            "disk-b: {kind: memory, params: {size: 256M}, restart: never}",
        )
    )
    data = compose.compose_dict(load_text(text, str(EXAMPLE)))
    assert data["services"]["disk-a"]["restart"] == "on-failure:3"
    assert data["services"]["disk-b"]["restart"] == "no"


def test_compose_check_reports_stale_output(tmp_path: Path, capsys) -> None:
    out = tmp_path / "docker-compose.yml"
    assert compose.main([str(EXAMPLE), "-o", str(out), "--check"]) == 1
    assert compose.main([str(EXAMPLE), "-o", str(out)]) == 0
    assert compose.main([str(EXAMPLE), "-o", str(out), "--check"]) == 0
    assert "stale" in capsys.readouterr().err


def test_k8s_pod_shares_sockets_and_probes_health() -> None:
    docs = k8s.manifests(load(EXAMPLE))
    text = k8s.render(docs, "compose/example.yaml")
    pod, service = list(yaml.safe_load_all(text))
    assert pod["kind"] == "Pod" and service["kind"] == "Service"
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    assert set(containers) == {"disk-a", "disk-b", "mirror", "slow"}
    assert {"name": "run", "emptyDir": {"medium": "Memory"}} in pod["spec"]["volumes"]
    mirror = containers["mirror"]
    assert "nbd+unix:///?socket=/run/nbdfabric/disk-a.sock" in mirror["args"]
    # Its member states outlive a restart of its container, in the pod's emptyDir.
    assert "bitmap-file=/run/nbdfabric/mirror.state" in mirror["args"]
    assert not any("-file=" in a for a in containers["slow"]["args"])
    assert mirror["readinessProbe"]["exec"]["command"] == [
        "nbdfabric", "health", "-q", "unix:/run/nbdfabric/mirror.ctl"
    ]  # fmt: skip
    assert service["spec"]["ports"][0]["port"] == 10809
    assert service["spec"]["selector"] == pod["metadata"]["labels"]


def test_k8s_import_job_runs_nodes_as_sidecars(capsys) -> None:
    assert k8s.main([str(IMPORT), "--import-to", "vm-disk"]) == 0
    (job,) = list(yaml.safe_load_all(capsys.readouterr().out))
    assert job["kind"] == "Job"
    spec = job["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["source", "throttle", "retries"]
    source = spec["initContainers"][0]
    assert source["args"][:3] == ["node", "http", "url=https://images.example.org/fedora-40.raw"]
    assert all(c["restartPolicy"] == "Always" for c in spec["initContainers"])
    (importer,) = spec["containers"]
    assert importer["command"] == ["qemu-img"]
    assert "nbd+unix:///disk?socket=/run/nbdfabric/retries.sock" in importer["args"]
    # The export stays inside the pod: no TCP listener, no port (the topology has one).
    retries = spec["initContainers"][2]
    assert [a for a in retries["args"] if a.startswith("0.0.0.0")] == [] and "ports" not in retries
    assert {"name": "target", "persistentVolumeClaim": {"claimName": "vm-disk"}} in spec["volumes"]
    assert spec["restartPolicy"] == "Never"


def test_compose_cli_wires_a_filter_to_one_file_of_a_directory_node(tmp_path: Path, capsys) -> None:
    """`nbdfabric compose`: `upstream: files/a.img` is `nbd://files:10809/a.img`, the directory
    is mounted, and the exported directory node is not given an export name it would refuse."""
    (tmp_path / "disks").mkdir()
    f = tmp_path / "fabric.yaml"
    f.write_text(
        "name: d\nnodes:\n  files: {kind: file, params: {dir: disks}}\n"
        "  cow: {kind: cow, upstream: files/a.img}\n"
        "exports:\n  all: {node: files, listen: ['127.0.0.1:10900']}\n"
        "  vm: {node: cow, listen: ['127.0.0.1:10901']}\n"
    )
    assert compose.main([str(f)]) == 0
    services = yaml.safe_load(capsys.readouterr().out)["services"]
    cow, files = services["cow"], services["files"]
    assert cow["command"][cow["command"].index("--upstream") + 1] == "nbd://files:10809/a.img"
    assert cow["depends_on"] == {"files": {"condition": "service_healthy"}}
    assert "--export-name" not in files["command"]
    assert "dir=/mnt/nbdfabric/0/disks" in files["command"]
    assert files["volumes"] == [f"{tmp_path}:/mnt/nbdfabric/0"]
    assert files["ports"] == ["127.0.0.1:10900:10809"]


def test_k8s_tls_export_reads_its_certificates_from_a_secret(tmp_path: Path) -> None:
    """An export with TLS keeps it in the pod (it was dropped: served in plain text): its node
    reads the certificates from a read-only Secret volume, group-readable by the nodes' fsGroup,
    and the header says how to make the Secret. An import Job, which serves the export on its
    unix socket only, needs none."""
    (tmp_path / "fabric.yaml").write_text(
        "name: sec\nnodes:\n  disk: {kind: memory, params: {size: 1M}}\nexports:\n"
        '  vm: {node: disk, listen: ["0.0.0.0:10809"], tls: require, tls-certificates: pki}\n'
    )
    top = load(tmp_path / "fabric.yaml")
    (pod, _service) = k8s.manifests(top)
    (disk,) = pod["spec"]["containers"]
    args = disk["args"]
    assert "--tls=require" in args
    assert args[args.index("--tls-certificates") + 1] == "/etc/nbdfabric/tls/vm"
    assert {"name": "tls-vm", "mountPath": "/etc/nbdfabric/tls/vm", "readOnly": True} in disk[
        "volumeMounts"
    ]
    assert {"name": "tls-vm", "secret": {"secretName": "sec-vm-tls", "defaultMode": 0o440}} in (
        pod["spec"]["volumes"]
    )
    assert pod["spec"]["securityContext"]["fsGroup"] == pod["spec"]["securityContext"]["runAsUser"]
    text = k8s.render(k8s.manifests(top), "fabric.yaml", k8s.secret_commands(top))
    assert f"#   kubectl create secret generic sec-vm-tls --from-file={tmp_path}/pki\n" in text
    job = k8s.import_job(top, "vm", "claim")
    (sidecar,) = job["spec"]["template"]["spec"]["initContainers"]
    assert not any(a.startswith("--tls") for a in sidecar["args"])
    assert not any("secret" in v for v in job["spec"]["template"]["spec"]["volumes"])
