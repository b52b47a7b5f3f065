"""Plans: in which order nodes start (upstreams first) and what re-applying an edited topology
does to a running fabric, node by node. Pure: topologies in, lists out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nodes.params import live_names

from .topology import Export, Node, Topology

UNCHANGED, ADD, RESTART, CONFIGURE, REMOVE = "unchanged", "add", "restart", "configure", "remove"


def levels(topology: Topology) -> list[list[str]]:
    """Nodes grouped so that each group only needs nodes of earlier groups (leaves first).

    Within a group the file's order is kept. The topology has no cycles (validated).
    """
    depth: dict[str, int] = {}

    def level(name: str) -> int:
        if name not in depth:
            ups = topology.nodes[name].node_upstreams()
            depth[name] = 1 + max((level(u) for u in ups), default=-1)
        return depth[name]

    out: list[list[str]] = []
    for name in topology.nodes:
        d = level(name)
        while len(out) <= d:
            out.append([])
    for name in topology.nodes:
        out[depth[name]].append(name)
    return out


def start_order(topology: Topology) -> list[str]:
    return [name for group in levels(topology) for name in group]


def stop_order(topology: Topology) -> list[str]:
    """Dependents before their upstreams."""
    return list(reversed(start_order(topology)))


@dataclass(frozen=True)
class Action:
    node: str
    action: str  #: unchanged | add | restart | configure | remove
    reason: str = ""
    #: For `configure`: live param -> new value as written in the file.
    changes: dict[str, Any] = field(default_factory=dict)


def _export_key(export: Export | None) -> Any:
    return None if export is None else (export.name, export)


def node_diff(old: Node, new: Node, old_top: Topology, new_top: Topology) -> Action:
    """How to bring one running node to its new definition."""
    name = new.name
    reasons = []
    if old.kind != new.kind:
        return Action(name, RESTART, f"kind {old.kind} -> {new.kind}")
    if old.upstreams != new.upstreams:
        reasons.append("upstreams changed")
    if _export_key(old_top.export_of(name)) != _export_key(new_top.export_of(name)):
        reasons.append("export changed")
    if old_top.base_dir != new_top.base_dir and old.raw_params != new.raw_params:
        reasons.append("file moved")
    if old.poll_max_us != new.poll_max_us:
        reasons.append(f"poll-max-us {old.poll_max_us} -> {new.poll_max_us}")
    if old.workers != new.workers:
        reasons.append(f"workers {old.workers} -> {new.workers}")
    before, after = old.normalized_params(), new.normalized_params()
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    live = live_names(type(new.params))
    fixed = [k for k in changed if k not in live]
    if fixed:
        reasons.append("params changed: " + ", ".join(fixed))
    if reasons:
        return Action(name, RESTART, "; ".join(reasons))
    if changed:
        values = {k: new.raw_params.get(k, after.get(k)) for k in changed}
        return Action(name, CONFIGURE, "live params: " + ", ".join(changed), values)
    if (old.restart, old.max_restarts) != (new.restart, new.max_restarts):
        return Action(name, UNCHANGED, "restart policy updated")
    if old.healthcheck != new.healthcheck:  # the supervisor reads it at each check
        return Action(name, UNCHANGED, "healthcheck updated")
    return Action(name, UNCHANGED)


def diff(old: Topology | None, new: Topology) -> list[Action]:
    """Actions to go from `old` (running, or None) to `new`: removals first (dependents
    before upstreams), then the new topology's nodes in start order."""
    actions: list[Action] = []
    if old is not None:
        for name in stop_order(old):
            if name not in new.nodes:
                actions.append(Action(name, REMOVE, "not in the topology any more"))
    for name in start_order(new):
        if old is None or name not in old.nodes:
            actions.append(Action(name, ADD, "new node"))
        else:
            actions.append(node_diff(old.nodes[name], new.nodes[name], old, new))
    return actions
