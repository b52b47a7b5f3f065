"""Topology files (pure): every invalid case with its exact message and line, start order,
re-apply plans, JSON Schema and graphs. The kinds are the real registry's."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path, PurePosixPath

import pytest

from orchestrator import graph, plan
from orchestrator.argv import export_words
from orchestrator.names import Ref, node_ref
from orchestrator.topology import (
    Topology,
    TopologyError,
    json_schema,
    load,
    load_text,
)

ROOT = Path(__file__).resolve().parent.parent

CHAIN = """\
name: t
nodes:
  disk: {kind: memory, params: {size: 1M}}
  slow: {kind: delay, upstream: disk, params: {delay-read: 1ms}}
exports:
  vm1: {node: slow, listen: ["127.0.0.1:10809"]}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(TopologyError) as info:
        load_text(textwrap.dedent(text), "f.yaml", env={"HOME": "/h"})
    return str(info.value).splitlines()


INVALID = [
    (
        "unknown kind",
        "nodes:\n  a: {kind: memroy}\n",
        "f.yaml:2: nodes.a.kind: unknown kind 'memroy', did you mean 'memory'? (known: ",
    ),
    (
        "unknown param",
        "nodes:\n  a:\n    kind: memory\n    params: {size: 1M, sise: 2}\n",
        "f.yaml:4: nodes.a.params.sise: unknown parameter of memory, did you mean 'size'? "
        "(accepts: size)",
    ),
    (
        "bad value",
        "nodes:\n  a: {kind: memory, params: {size: big}}\n",
        "f.yaml:2: nodes.a.params.size: bad value 'big' for memory (accepts size): "
        "expected a size like 1G, 512K or a byte count",
    ),
    (
        "missing param",
        "nodes:\n  a: {kind: memory}\n",
        "f.yaml:2: nodes.a.params: memory needs parameter 'size'",
    ),
    (
        "unknown upstream",
        "nodes:\n  a: {kind: memory, params: {size: 1M}}\n  b: {kind: delay, upstream: x}\n",
        "f.yaml:3: nodes.b.upstream: no node named 'x' (nodes: a, b)",
    ),
    (
        "filter without upstream",
        "nodes:\n  b: {kind: delay}\n",
        "f.yaml:2: nodes.b: delay is a filter: it needs 'upstream: NODE'",
    ),
    (
        "plugin with upstream",
        "nodes:\n  a: {kind: memory, params: {size: 1M}}\n"
        "  b: {kind: memory, params: {size: 1M}, upstream: a}\n",
        "f.yaml:3: nodes.b.upstream: memory is a plugin: it takes no upstream",
    ),
    (
        "fan with too few members",
        "nodes:\n  a: {kind: memory, params: {size: 1M}}\n  m: {kind: mirror, upstreams: [a]}\n",
        "f.yaml:3: nodes.m.upstreams: mirror is a fan: it needs at least 2 members in "
        "'upstreams' (got 1)",
    ),
    (
        "cycle",
        "nodes:\n  a: {kind: delay, upstream: b}\n  b: {kind: delay, upstream: a}\n",
        "f.yaml:3: nodes.b.upstream: cycle: a -> b -> a",
    ),
    (
        "own upstream",
        "nodes:\n  a: {kind: delay, upstream: a}\n",
        "f.yaml:2: nodes.a.upstream: a node cannot be its own upstream",
    ),
    (
        "two exports on one address",
        "nodes:\n  a: {kind: memory, params: {size: 1M}}\n  b: {kind: memory, params: {size: 1M}}\n"
        "exports:\n  x: {node: a, listen: ['127.0.0.1:10809']}\n"
        "  y: {node: b, listen: ['0.0.0.0:10809']}\n",
        "f.yaml:6: exports.y.listen[0]: address 0.0.0.0:10809 is already used by export 'x'",
    ),
    (
        "two exports on one unix socket",
        "nodes:\n  a: {kind: memory, params: {size: 1M}}\n  b: {kind: memory, params: {size: 1M}}\n"
        "exports:\n  x: {node: a, listen: ['unix:/tmp/s']}\n"
        "  y: {node: b, listen: ['unix:/tmp/s']}\n",
        "f.yaml:6: exports.y.listen[0]: address unix:/tmp/s is already used by export 'x'",
    ),
    (
        "export of an unknown node",
        "nodes:\n  a: {kind: memory, params: {size: 1M}}\n"
        "exports:\n  x: {node: b, listen: [':0']}\n",
        "f.yaml:4: exports.x.node: no node named 'b' (nodes: a)",
    ),
    (
        "one node exported twice",
        "nodes:\n  a: {kind: memory, params: {size: 1M}}\nexports:\n"
        "  x: {node: a, listen: [':0']}\n  y: {node: a, listen: [':0']}\n",
        "f.yaml:5: exports.y.node: node 'a' is already exported as 'x' (one export per node; "
        "put a filter in front to export it again)",
    ),
    (
        "bad listen address",
        "nodes:\n  a: {kind: memory, params: {size: 1M}}\nexports:\n"
        "  x: {node: a, listen: ['host:port']}\n",
        "f.yaml:4: exports.x.listen[0]: 'host:port': port 'port' is not a number",
    ),
    (
        "unknown node field",
        "nodes:\n  a: {kind: memory, params: {size: 1M}, restrat: never}\n",
        "f.yaml:2: nodes.a.restrat: unknown field, did you mean 'restart'? (accepts: kind, "
        "params, upstream, upstreams, restart, max-restarts, poll-max-us, workers, healthcheck)",
    ),
    (
        "bad restart policy",
        "nodes:\n  a: {kind: memory, params: {size: 1M}, restart: sometimes}\n",
        "f.yaml:2: nodes.a.restart: bad value 'sometimes': Input should be 'always', "
        "'on-failure' or 'never'",
    ),
    (
        "upstream and upstreams",
        "nodes:\n  a: {kind: memory, params: {size: 1M}}\n"
        "  b: {kind: delay, upstream: a, upstreams: [a]}\n",
        "f.yaml:3: nodes.b: give either 'upstream' or 'upstreams', not both",
    ),
    (
        "duplicate key",
        "nodes:\n  a: {kind: memory, params: {size: 1M}}\n"
        "  a: {kind: memory, params: {size: 2M}}\n",
        "f.yaml:3: nodes.a: duplicate key (the first is ignored)",
    ),
    (
        "YAML syntax",
        "nodes:\n  a: {kind: memory\n",
        "f.yaml:3: YAML syntax error: expected ',' or '}', but got '<stream end>'",
    ),
    (
        "no nodes",
        "name: x\n",
        "f.yaml:1: nodes: a fabric needs at least one node (nodes: {NAME: {kind: ..}})",
    ),
    (
        "unknown top-level key",
        "nodes:\n  a: {kind: memory, params: {size: 1M}}\nexport: {}\n",
        "f.yaml:3: export: unknown key (accepts: name, nodes, exports)",
    ),
    (
        "negative poll time",
        "nodes:\n  a: {kind: memory, params: {size: 1M}, poll-max-us: -1}\n",
        "f.yaml:2: nodes.a.poll-max-us: ",
    ),
    (
        "no workers",
        "nodes:\n  a: {kind: memory, params: {size: 1M}, workers: 0}\n",
        "f.yaml:2: nodes.a.workers: bad value 0: Input should be greater than or equal to 1",
    ),
    (
        "negative workers",
        "nodes:\n  a: {kind: memory, params: {size: 1M}, workers: -1}\n",
        "f.yaml:2: nodes.a.workers: bad value -1: Input should be greater than or equal to 1",
    ),
    (
        "workers not a number",
        "nodes:\n  a: {kind: memory, params: {size: 1M}, workers: two}\n",
        "f.yaml:2: nodes.a.workers: bad value 'two': expected a whole number, not 'two'",
    ),
    (
        "workers on a kind that keeps its state in one process",
        "nodes:\n  a: {kind: memory, params: {size: 1M}}\n"
        "  b: {kind: cow, upstream: a, workers: 2}\n",
        "f.yaml:3: nodes.b.workers: cow keeps its state in one process, so it cannot be served by "
        "several workers (kinds that can: data, file, full, http, memory, nbd, nofilter, null, "
        "partitioning, pattern, split, ssh, zero)",
    ),
    (
        "workers on a fan",
        "nodes:\n  a: {kind: memory, params: {size: 1M}}\n  c: {kind: memory, params: {size: 1M}}\n"
        "  m:\n    kind: mirror\n    upstreams: [a, c]\n    workers: 3\n",
        "f.yaml:7: nodes.m.workers: mirror keeps its state in one process, so it cannot be served "
        "by several workers (kinds that can: ",
    ),
    (
        "a directory node named without one of its files",
        "nodes:\n  files: {kind: file, params: {dir: /srv}}\n  c: {kind: cow, upstream: files}\n",
        "f.yaml:3: nodes.c.upstream: node 'files' serves a directory (one export per file): name "
        "one of its files, 'files/NAME'",
    ),
    (
        "an export of a node that serves one",
        "nodes:\n  disk: {kind: memory, params: {size: 1M}}\n  m:\n    kind: mirror\n"
        "    upstreams:\n      - disk\n      - disk/x\n",
        "f.yaml:7: nodes.m.upstreams[1]: node 'disk' serves one export: write 'disk' "
        "('NODE/EXPORT' names one export of a node that serves several, as file with dir= does)",
    ),
    (
        "nothing after the slash",
        "nodes:\n  files: {kind: file, params: {dir: /srv}}\n  c: {kind: cow, upstream: files/}\n",
        "f.yaml:3: nodes.c.upstream: 'files/' names no export after '/': write 'files/NAME'",
    ),
    (
        "an export of an unknown node",
        "nodes:\n  a: {kind: memory, params: {size: 1M}}\n  c: {kind: cow, upstream: x/a.img}\n",
        "f.yaml:3: nodes.c.upstream: no node named 'x' (nodes: a, c)",
    ),
    (
        "an export of itself",
        "nodes:\n  c: {kind: cow, upstream: c/a.img}\n",
        "f.yaml:2: nodes.c.upstream: a node cannot be its own upstream",
    ),
    (
        "one file of a directory node exported",
        "nodes:\n  files: {kind: file, params: {dir: /srv}}\n"
        "exports:\n  x: {node: files/a.img, listen: [':0']}\n",
        "f.yaml:4: exports.x.node: no node named 'files/a.img' (nodes: files); to export "
        "'files/a.img' alone, put a filter over it",
    ),
    (
        "one node twice in a fan",
        "nodes:\n  a: {kind: memory, params: {size: 1M}}\n  b: {kind: memory, params: {size: 1M}}\n"
        "  m:\n    kind: stripe\n    upstreams:\n      - a\n      - b\n      - a\n",
        "f.yaml:9: nodes.m.upstreams[2]: stripe 'm': members 0 and 2 are the same export ('a' "
        "given twice): each member must be a different export, or the fan would use one as two",
    ),
    (
        "one file of a directory node twice in a fan",
        "nodes:\n  files: {kind: file, params: {dir: /srv}}\n"
        "  m: {kind: mirror, upstreams: [files/a.img, files/a.img]}\n",
        "f.yaml:3: nodes.m.upstreams[1]: mirror 'm': members 0 and 1 are the same export "
        "('files/a.img' given twice): each member must be a different export, or the fan would "
        "use one as two",
    ),
    (
        "one NBD server twice in a fan, spelled two ways",
        "nodes:\n  q:\n    kind: quorum\n    upstreams:\n      - nbd://disks:10809/x\n"
        "      - nbds://Disks/x\n      - nbd://disks/y\n",
        "f.yaml:6: nodes.q.upstreams[1]: quorum 'q': members 0 and 1 are the same export "
        "('nbd://disks:10809/x' and 'nbds://Disks/x'): each member must be a different export, "
        "or the fan would use one as two",
    ),
    (
        "healthcheck: an unknown key",
        "nodes:\n  a:\n    kind: memory\n    healthcheck: {interval: 1s, timout: 2s}\n",
        "f.yaml:4: nodes.a.healthcheck.timout: unknown field, did you mean 'timeout'? (accepts: "
        "interval, timeout, retries, start-period, grace)",
    ),
    (
        "healthcheck: not a duration",
        "nodes:\n  a: {kind: memory, healthcheck: {grace: soon}}\n",
        "f.yaml:2: nodes.a.healthcheck.grace: bad value 'soon': expected a duration like 10ms, "
        "2s or a number of seconds",
    ),
    (
        "healthcheck: checks at no interval",
        "nodes:\n  a: {kind: memory, healthcheck: {interval: 0ms}}\n",
        "f.yaml:2: nodes.a.healthcheck.interval: bad value 0.0: Input should be greater than 0",
    ),
    (
        "healthcheck: no retries",
        "nodes:\n  a: {kind: memory, healthcheck: {retries: 0}}\n",
        "f.yaml:2: nodes.a.healthcheck.retries: bad value 0: Input should be greater than or "
        "equal to 1",
    ),
    (
        "unset variable",
        "nodes:\n  a: {kind: memory, params: {size: '${DISK_SIZE}'}}\n",
        "f.yaml:2: variable DISK_SIZE is not set",
    ),
]


@pytest.mark.parametrize(("case", "text", "message"), INVALID, ids=[c[0] for c in INVALID])
def test_topology_rejects_with_message(case: str, text: str, message: str) -> None:
    found = problems(text)
    assert any(line.startswith(message) for line in found), found
    if not message.endswith(" "):
        assert message in found


def test_topology_reports_every_problem_at_once() -> None:
    found = problems("nodes:\n  a: {kind: memroy}\n  b: {kind: delay}\n  c: {kind: memory}\n")
    assert len(found) == 3


def test_topology_loads_chain_with_typed_params() -> None:
    top = load_text(CHAIN, "f.yaml")
    assert top.name == "t"
    assert top.nodes["disk"].params.size == 1 << 20  # type: ignore[attr-defined]
    assert top.nodes["slow"].upstreams == ("disk",)
    assert top.nodes["slow"].role == "filter"
    assert top.exports["vm1"].node == "slow"
    assert top.export_of("slow") is top.exports["vm1"]


DIRECTORY = """\
name: t
nodes:
  files: {kind: file, params: {dir: /srv/disks}}
  disk: {kind: file, params: {file: /srv/disk.img}}
  a: {kind: cow, upstream: files/a.img}
  b: {kind: nbd, upstream: files/b.img}
  m: {kind: mirror, upstreams: [files/c.img, files/d/e, disk]}
exports:
  dir: {node: files, listen: ["unix:/run/d.sock"]}
  va: {node: a, listen: ["unix:/run/a.sock"]}
"""


def test_node_ref_splits_at_the_first_slash() -> None:
    assert node_ref("disk") == Ref("disk", None)
    assert node_ref("files/a.img") == Ref("files", "a.img")
    assert node_ref("files/d/e") == Ref("files", "d/e")  # the node decides what names it serves
    assert node_ref("files/") == Ref("files", "")


def test_topology_directory_references_are_links_to_the_node() -> None:
    top = load_text(DIRECTORY, "f.yaml")
    files, disk = top.nodes["files"], top.nodes["disk"]
    assert (files.multi_export, disk.multi_export) == ("directory", None)
    assert top.nodes["a"].upstreams == ("files/a.img",)
    assert top.nodes["m"].node_upstreams() == ("files", "disk")  # each node once
    assert plan.levels(top) == [["files", "disk"], ["a", "b", "m"]]
    assert top.dependents("files") == ["a", "b", "m"]
    # Exported, the directory node serves every file under no name of its own.
    exported = top.exports["dir"]
    assert (exported.multi_export, exported.served_name) == ("directory", "")
    assert "--export-name" not in export_words(exported)
    assert export_words(top.exports["va"])[:2] == ["--export-name", "va"]
    assert top.exports["va"].served_name == "va"


def test_topology_directory_plan_rewires_on_another_file() -> None:
    acts = _actions(DIRECTORY, DIRECTORY.replace("files/b.img", "files/z.img"))
    assert acts["b"] == ("restart", "upstreams changed")
    assert acts["files"] == acts["a"] == ("unchanged", "")


def test_topology_expands_variables_with_defaults() -> None:
    text = (
        "nodes:\n  a: {kind: memory, params: {size: '${S:-2M}'}}\n"
        "  b: {kind: null, params: {size: '${T}'}}\n"
    )
    top = load_text(text, "f.yaml", env={"T": "4K"})
    assert top.nodes["a"].params.size == 2 << 20  # type: ignore[attr-defined]
    assert top.nodes["b"].params.size == 4096  # type: ignore[attr-defined]


def test_topology_default_name_is_the_directory(tmp_path: Path) -> None:
    f = tmp_path / "fabric.yaml"
    f.write_text("nodes:\n  a: {kind: memory, params: {size: 1M}}\n")
    assert load(f).name == tmp_path.name


def test_topology_demo_example_is_valid() -> None:
    top = load(ROOT / "compose/examples/demo.yaml")
    assert "vm1" in top.exports


def test_plan_start_order_is_leaves_first() -> None:
    top = load_text(
        "nodes:\n  top: {kind: delay, upstream: m}\n  m: {kind: mirror, upstreams: [a, b]}\n"
        "  a: {kind: memory, params: {size: 1M}}\n  b: {kind: memory, params: {size: 1M}}\n",
        "f.yaml",
    )
    assert plan.levels(top) == [["a", "b"], ["m"], ["top"]]
    assert plan.start_order(top) == ["a", "b", "m", "top"]
    assert plan.stop_order(top) == ["top", "m", "b", "a"]


def _actions(old: str, new: str) -> dict[str, tuple[str, str]]:
    a, b = load_text(old, "f.yaml"), load_text(new, "f.yaml")
    return {x.node: (x.action, x.reason) for x in plan.diff(a, b)}


def test_plan_diff_unchanged_when_same_value_spelled_differently() -> None:
    acts = _actions(CHAIN, CHAIN.replace("size: 1M", "size: 1048576"))
    assert acts == {"disk": ("unchanged", ""), "slow": ("unchanged", "")}


def test_plan_diff_fixed_param_restarts_only_that_node() -> None:
    acts = _actions(CHAIN, CHAIN.replace("size: 1M", "size: 2M"))
    assert acts == {"disk": ("restart", "params changed: size"), "slow": ("unchanged", "")}


def test_plan_diff_live_param_configures() -> None:
    a, b = load_text(CHAIN, "f.yaml"), load_text(CHAIN.replace("1ms", "5ms"), "f.yaml")
    (slow,) = [x for x in plan.diff(a, b) if x.node == "slow"]
    assert (slow.action, slow.changes) == ("configure", {"delay-read": "5ms"})


def test_plan_diff_added_removed_and_rewired() -> None:
    new = CHAIN.replace(
        "  slow: {kind: delay, upstream: disk, params: {delay-read: 1ms}}\n",
        "  d2: {kind: memory, params: {size: 1M}}\n"
        "  slow: {kind: delay, upstream: d2, params: {delay-read: 1ms}}\n",
    ).replace("  disk: {kind: memory, params: {size: 1M}}\n", "")
    acts = _actions(CHAIN, new)
    assert acts == {
        "disk": ("remove", "not in the topology any more"),
        "d2": ("add", "new node"),
        "slow": ("restart", "upstreams changed"),
    }
    order = [x.node for x in plan.diff(load_text(CHAIN, "f"), load_text(new, "f"))]
    assert order == ["disk", "d2", "slow"]


def test_plan_diff_export_change_restarts_exported_node() -> None:
    acts = _actions(CHAIN, CHAIN.replace("127.0.0.1:10809", "127.0.0.1:10810"))
    assert acts["slow"] == ("restart", "export changed")
    assert acts["disk"] == ("unchanged", "")


def assert_option_reaches_every_way(
    top: Topology, tmp_path: Path, option: str, value: str, on: str, off: str
) -> None:
    """`option value` is on node `on`'s command line, not on node `off`'s, and in the compose
    file and the Kubernetes manifests (the three ways of running a node)."""
    from orchestrator.backends.process import RunDir, node_command
    from orchestrator.compose import compose_dict
    from orchestrator.k8s import manifests

    cmd = node_command(top.nodes[on], top, RunDir(tmp_path / "run"), control=True)
    assert cmd[cmd.index(option) + 1] == value
    assert option not in node_command(top.nodes[off], top, RunDir(tmp_path), False)
    assert f"'{option}', '{value}'" in str(compose_dict(top))
    assert f"'{option}', '{value}'" in str(manifests(top))


def test_poll_max_us_reaches_every_way_of_running_the_node(tmp_path: Path) -> None:
    polled = CHAIN.replace("delay-read: 1ms}", "delay-read: 1ms}, poll-max-us: 50")
    top = load_text(polled, "f.yaml")
    assert (top.nodes["slow"].poll_max_us, top.nodes["disk"].poll_max_us) == (50, 0)
    assert_option_reaches_every_way(top, tmp_path, "--poll-max-us", "50", on="slow", off="disk")
    assert _actions(CHAIN, polled)["slow"] == ("restart", "poll-max-us 0 -> 50")
    schema = json.dumps(json_schema())
    assert '"poll_max_us"' in schema or '"poll-max-us"' in schema


def test_workers_reach_every_way_of_running_the_node(tmp_path: Path) -> None:
    from orchestrator.compose import compose_dict
    from orchestrator.k8s import manifests

    shared = CHAIN.replace("params: {size: 1M}}", "params: {size: 1M}, workers: 2}")
    top = load_text(shared, "f.yaml")
    assert (top.nodes["disk"].workers, top.nodes["slow"].workers) == (2, 1)
    assert_option_reaches_every_way(top, tmp_path, "--workers", "2", on="disk", off="slow")
    one = CHAIN.replace("delay-read: 1ms}", "delay-read: 1ms}, workers: 1")  # any kind takes 1
    single = load_text(one, "f.yaml")
    assert "'--workers'" not in str(compose_dict(single)) + str(manifests(single))
    assert _actions(CHAIN, one) == {"disk": ("unchanged", ""), "slow": ("unchanged", "")}
    assert _actions(CHAIN, shared)["disk"] == ("restart", "workers 1 -> 2")
    assert _actions(shared, CHAIN)["disk"] == ("restart", "workers 2 -> 1")
    assert _actions(CHAIN, shared)["slow"] == ("unchanged", "")
    nodes = json_schema()["$defs"]
    memory, cow = (nodes[n]["properties"]["workers"] for n in ("MemoryNode", "CowNode"))
    assert (memory["minimum"], memory.get("maximum")) == (1, None)
    assert (cow["minimum"], cow["maximum"]) == (1, 1)  # what validate refuses, editors do too


def test_directory_references_reach_every_way_of_running_the_node(tmp_path: Path) -> None:
    """Each filter's upstream URI names its file (percent-encoded), on every backend; the
    exported directory node gets no --export-name; compose waits for the node once."""
    from orchestrator import k8s
    from orchestrator.backends.process import RunDir, node_command
    from orchestrator.compose import compose_dict

    top = load_text(DIRECTORY.replace("files/b.img", "files/my disk#2.img"), "f.yaml")
    run = RunDir(tmp_path)

    def upstreams(words: list[str]) -> list[str]:
        return [words[i + 1] for i, w in enumerate(words) if w == "--upstream"]

    assert upstreams(node_command(top.nodes["a"], top, run, False)) == [
        f"nbd+unix:///a.img?socket={tmp_path}/files.sock"
    ]
    assert upstreams(node_command(top.nodes["b"], top, run, False)) == [
        f"nbd+unix:///my%20disk%232.img?socket={tmp_path}/files.sock"
    ]
    assert upstreams(node_command(top.nodes["m"], top, run, False))[1:] == [
        f"nbd+unix:///d%2Fe?socket={tmp_path}/files.sock",
        f"nbd+unix:///?socket={tmp_path}/disk.sock",
    ]
    assert "--export-name" not in node_command(top.nodes["files"], top, run, False)
    services = compose_dict(top)["services"]
    assert upstreams(services["a"]["command"]) == ["nbd://files:10809/a.img"]
    assert upstreams(services["b"]["command"]) == ["nbd://files:10809/my%20disk%232.img"]
    assert list(services["m"]["depends_on"]) == ["files", "disk"]
    assert "--export-name" not in services["files"]["command"]
    assert services["files"]["command"][2] == "dir=/mnt/nbdfabric/0/disks"
    (pod,) = k8s.manifests(top)
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    assert upstreams(containers["a"]["args"]) == [
        "nbd+unix:///a.img?socket=/run/nbdfabric/files.sock"
    ]
    assert "--export-name" not in containers["files"]["args"]
    assert containers["a"]["args"][-4:-2] == ["--export-name", "va"]
    with pytest.raises(ValueError, match="export 'dir' serves a directory, one export per file"):
        k8s.import_job(top, "dir", "pvc")


def test_topology_schema_has_every_kind_and_flexible_sizes() -> None:
    from nodes import registry

    schema = json_schema()
    text = json.dumps(schema)
    for kind in registry.kinds():
        assert f'"const": "{kind}"' in text, kind
    size = schema["$defs"]["MemoryParams"]["properties"]["size"]
    assert {"type": "string"} in size["anyOf"]


def test_graph_text_and_dot() -> None:
    top = load_text(CHAIN, "f.yaml")
    assert graph.text_tree(top).splitlines() == [
        "fabric t",
        "export vm1 [127.0.0.1:10809]",
        "└── slow (delay, delay-read=1ms)",
        "    └── disk (memory, size=1M)",
    ]
    dot = graph.dot(top)
    assert '"slow" -> "disk";' in dot
    assert '"export:vm1" -> "slow";' in dot


def test_graph_shows_the_export_each_upstream_reads() -> None:
    top = load_text(DIRECTORY, "f.yaml")
    tree = graph.text_tree(top).splitlines()
    assert tree[1:6] == [
        "export dir [unix:/run/d.sock]",
        "└── files (file, dir=/srv/disks) (shared)",
        "export va [unix:/run/a.sock]",
        "└── a (cow)",
        "    └── files/a.img (file, dir=/srv/disks) (shared)",
    ]
    assert tree[tree.index("└── b (nbd)") - 1] == "(not exported)"
    dot = graph.dot(top)
    assert '"a" -> "files" [label="a.img"];' in dot
    assert '"m" -> "files" [label="0: c.img"];' in dot
    assert '"m" -> "disk" [label=2];' in dot


def test_cli_validate_exit_status_and_message(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(CHAIN)
    bad.write_text(CHAIN.replace("kind: delay", "kind: dely"))
    cmd = [sys.executable, "-m", "nodes.cli", "validate"]
    ok = subprocess.run([*cmd, str(good)], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert "ok: fabric t, 2 nodes, 1 export" in ok.stdout
    ko = subprocess.run([*cmd, str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert ko.returncode == 1
    assert ko.stderr.startswith(
        f"{bad}:4: nodes.slow.kind: unknown kind 'dely', did you mean 'delay'? (known: "
    )


def test_topology_fan_member_twice_through_a_relative_socket(tmp_path: Path) -> None:
    """Nodes run in the file's directory: a relative socket there and its absolute path are
    one export, reported on the second one's line, by `validate` too (exit 1). Another
    file's sockets, or another export of one socket, are other members."""
    f = tmp_path / "fabric.yaml"
    f.write_text(
        "name: t\nnodes:\n  v:\n    kind: verify\n    upstreams:\n"
        "      - nbd+unix:///?socket=disks/m.sock\n"
        f"      - nbd+unix:///?socket={tmp_path}/disks/m.sock\n"
    )
    message = (
        f"{f}:7: nodes.v.upstreams[1]: verify 'v': members 0 and 1 are the same export "
        f"('nbd+unix:///?socket=disks/m.sock' and 'nbd+unix:///?socket={tmp_path}/disks/m.sock')"
        ": each member must be a different export, or the fan would use one as two"
    )
    with pytest.raises(TopologyError) as info:
        load(f)
    assert str(info.value) == message
    cmd = [sys.executable, "-m", "nodes.cli", "validate", str(f)]
    ko = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert ko.returncode == 1
    assert ko.stderr == message + "\n"
    f.write_text(f.read_text().replace(str(tmp_path), str(tmp_path / "other")))
    assert len(load(f).nodes["v"].upstreams) == 2
    f.write_text(f.read_text().replace(f"///?socket={tmp_path}/other", "///b?socket=."))
    assert len(load(f).nodes["v"].upstreams) == 2


def test_healthcheck_reaches_every_watcher(tmp_path: Path) -> None:
    """A node's `healthcheck:` times the supervisor's checks, the compose file's and the
    engine's health checks and the pod's probes; each keeps its own default for what the file
    leaves out, and another healthcheck is taken without a restart."""
    from orchestrator.compose import COMPOSE_HEALTH, compose_dict, engine_healthcheck
    from orchestrator.k8s import PROBES, manifests
    from orchestrator.supervisor import WATCH

    watched = CHAIN.replace(
        "delay-read: 1ms}",
        "delay-read: 1ms}, healthcheck: {interval: 1500ms, timeout: 4, retries: 2, "
        "start_period: 2m, grace: 30s}",
    )
    top = load_text(watched, "f.yaml")
    slow, disk = top.nodes["slow"], top.nodes["disk"]
    assert slow.healthcheck.over(WATCH) == (1.5, 4.0, 2, 120.0, 30.0)
    assert disk.healthcheck.over(WATCH) == WATCH
    services = compose_dict(top)["services"]
    assert {k: v for k, v in services["slow"]["healthcheck"].items() if k != "test"} == {
        "interval": "1500ms", "timeout": "4s", "retries": 2, "start_period": "120s"
    }  # fmt: skip
    assert services["disk"]["healthcheck"]["interval"] == f"{COMPOSE_HEALTH.interval:g}s"
    assert engine_healthcheck(slow) == {
        "interval": 1_500_000_000, "timeout": 4_000_000_000, "retries": 2,
        "start_period": 120_000_000_000,
    }  # fmt: skip
    (pod,) = [d for d in manifests(top) if d["kind"] == "Pod"]
    probes = {c["name"]: c for c in pod["spec"]["containers"]}
    liveness = probes["slow"]["livenessProbe"]
    assert (liveness["periodSeconds"], liveness["timeoutSeconds"]) == (2, 4)  # whole seconds
    assert liveness["failureThreshold"] == 2
    assert probes["slow"]["startupProbe"]["failureThreshold"] == 120  # one a second
    assert probes["disk"]["livenessProbe"]["periodSeconds"] == PROBES.interval
    assert probes["disk"]["livenessProbe"]["failureThreshold"] == PROBES.retries
    assert _actions(CHAIN, watched)["slow"] == ("unchanged", "healthcheck updated")
    assert _actions(watched, watched)["slow"] == ("unchanged", "")
    schema = json_schema()["$defs"]
    assert set(schema["HealthcheckDef"]["properties"]) == {
        "interval", "timeout", "retries", "start-period", "grace"
    }  # fmt: skip


PATHS = """\
name: t
nodes:
  a: {kind: split, params: {file: [disks/a.img, disks/b.img]}}
  listed: {kind: extentlist, upstream: a, params: {extentlist: maps/a.extents}}
  logged: {kind: log, upstream: listed, params: {logfile: logs/requests.jsonl}}
  counted: {kind: stats, upstream: logged, params: {statsfile: logs/stats.json, statsappend: true}}
"""


def test_every_file_param_is_seen_where_the_container_mounts_it(tmp_path: Path) -> None:
    """Params declared with path=True (a log's logfile, an extentlist, each file of a split)
    are rewritten to where the compose service's or the pod's container mounts their host
    directory, and only those: they were left as host paths, which the node inside the
    container could not open (only `file`, `dir`, `*-file` and `*-dir` were mapped)."""
    from orchestrator.compose import MOUNT_ROOT, compose_dict
    from orchestrator.k8s import DATA_ROOT, manifests

    top = load_text(PATHS, str(tmp_path / "f.yaml"))
    services = compose_dict(top)["services"]

    def host(service: str, key: str) -> list[Path]:
        """Where the service's `key=` values are on the host, through its volumes."""
        volumes = {v.split(":")[1]: Path(v.split(":")[0]) for v in services[service]["volumes"]}
        words = [w for w in services[service]["command"] if w.startswith(f"{key}=")]
        paths = [PurePosixPath(w.split("=", 1)[1]) for w in words]
        assert all(p.is_relative_to(MOUNT_ROOT) for p in paths), words
        return [volumes[str(p.parent)] / p.name for p in paths]

    assert host("a", "file") == [tmp_path / "disks/a.img", tmp_path / "disks/b.img"]
    assert host("listed", "extentlist") == [tmp_path / "maps/a.extents"]
    assert host("logged", "logfile") == [tmp_path / "logs/requests.jsonl"]
    assert host("counted", "statsfile") == [tmp_path / "logs/stats.json"]
    assert "statsappend=true" in services["counted"]["command"]  # not a path: as written
    (pod,) = [d for d in manifests(top) if d["kind"] == "Pod"]
    args = {c["name"]: c["args"] for c in pod["spec"]["containers"]}
    for name, key in (("listed", "extentlist"), ("logged", "logfile"), ("a", "file")):
        words = [w for w in args[name] if w.startswith(f"{key}=")]
        assert words and all(w.split("=", 1)[1].startswith(f"{DATA_ROOT}/") for w in words)


def test_params_that_name_files_are_declared_so() -> None:
    """A param that names a file or directory by its name (`file`, `*-file`, `*file`, `dir`,
    an extent list, a CA bundle) is declared with path=True, and such a param holds text: a new
    kind that forgets the marker would have its file left behind by compose and Kubernetes."""
    from nodes import registry
    from nodes.params import field_info

    looks_like_a_path = re.compile(r"(^|-)(file|dir)$|file$|^extentlist$|^cainfo$")
    #: Names of files that are not the host's: ext2file is a file in the upstream's file system.
    not_host_files = {("ext2", "ext2file")}
    for kind, cls in registry.kinds().items():
        for entry in field_info(cls.Params):
            name = entry["name"]
            if looks_like_a_path.search(name) and (kind, name) not in not_host_files:
                assert entry["path"], f"{kind}: {name} names a file but is not path=True"
            if entry["path"]:
                assert entry["type"] == "string", f"{kind}: {name} is a path of {entry['type']}"


SECRETS = """\
name: t
nodes:
  img: {kind: memory, params: {size: 1M}}
  plain: {kind: luks, upstream: img, params: {passphrase: +keys/disk.pass}}
  web: {kind: http, params: {url: "http://h/x", user: u, password: hunter2}}
"""


def test_secrets_in_files_are_mapped_and_secrets_in_clear_are_warned_of(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A secret given as +FILE (nodes/passwords.py) names a file: compose and Kubernetes map it
    into the container as they map paths (it stayed a host path the node could not read). One
    given in clear ends up in the generated file, and in every listing of the node's command
    line: `nbdfabric compose` and `k8s` say so on stderr, naming the node and the param."""
    from orchestrator import compose, k8s
    from orchestrator.compose import MOUNT_ROOT, compose_dict
    from orchestrator.k8s import DATA_ROOT, manifests

    (tmp_path / "f.yaml").write_text(SECRETS)
    top = load(tmp_path / "f.yaml")
    service = compose_dict(top)["services"]["plain"]
    (word,) = [w for w in service["command"] if w.startswith("passphrase=")]
    inside = PurePosixPath(word.removeprefix("passphrase=+"))
    assert inside.is_relative_to(MOUNT_ROOT) and inside.name == "disk.pass"
    host = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}[str(inside.parent)]
    assert Path(host).resolve() == tmp_path / "keys"
    (pod,) = [d for d in manifests(top) if d["kind"] == "Pod"]
    (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "plain"]
    assert any(a.startswith(f"passphrase=+{DATA_ROOT}/") for a in container["args"])
    for main in (compose.main, k8s.main):
        assert main([str(tmp_path / "f.yaml")]) == 0
        err = capsys.readouterr().err.splitlines()
        assert err == [
            f"nbdfabric {'compose' if main is compose.main else 'k8s'}: warning: node 'web': "
            "password is written out in clear (as is every node argument); give it as "
            "password: +FILE to keep it in a file"
        ], err
