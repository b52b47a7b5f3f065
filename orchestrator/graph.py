"""Drawing a topology: a text tree from each export (or unexported root) down to its plugins,
and Graphviz DOT. Pure.
"""

from __future__ import annotations

from .names import is_uri, node_ref
from .topology import Node, Topology


def _label(node: Node, name: str = "") -> str:
    """`disk (memory, size=1M)`; `name` replaces the node's own (`files/a.img` for one export)."""
    params = " ".join(f"{k}={v}" for k, v in node.raw_params.items())
    return f"{name or node.name} ({node.kind}{', ' + params if params else ''})"


def text_tree(topology: Topology) -> str:
    lines = [f"fabric {topology.name}"]
    used = {u for n in topology.nodes.values() for u in n.node_upstreams()}
    roots: list[tuple[str, str]] = [
        (f"export {e.name} [{', '.join(e.listen)}]", e.node) for e in topology.exports.values()
    ]
    exported = {e.node for e in topology.exports.values()}
    roots += [("(not exported)", n) for n in topology.nodes if n not in used | exported]

    def walk(up: str, prefix: str, last: bool, seen: tuple[str, ...]) -> None:
        branch = "└── " if last else "├── "
        if is_uri(up):
            lines.append(f"{prefix}{branch}{up} (external)")
            return
        name = node_ref(up).node
        node = topology.nodes[name]
        users = sum(name in n.node_upstreams() for n in topology.nodes.values())
        shared = " (shared)" if users > 1 else ""
        lines.append(f"{prefix}{branch}{_label(node, up)}{shared}")
        child_prefix = prefix + ("    " if last else "│   ")
        for i, child in enumerate(node.upstreams):
            walk(child, child_prefix, i == len(node.upstreams) - 1, (*seen, name))

    for title, node in roots:
        lines.append(title)
        walk(node, "", True, ())
    return "\n".join(lines)


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _edge_attrs(node: Node, index: int, export: str | None) -> str:
    """A fan's member index and the export an edge reads, if any: ` [label="0: a.img"]`."""
    parts = [str(index)] if node.role == "fan" else []
    if export is not None:
        parts.append(export)
    if not parts:
        return ""
    label = ": ".join(parts)
    return f" [label={label if label.isdigit() else _q(label)}]"


def dot(topology: Topology) -> str:
    """Edges point the way data requests flow: client -> export -> node -> upstream."""
    out = [f"digraph {_q(topology.name)} {{", "  rankdir=TB;", "  node [fontname=monospace];"]
    for node in topology.nodes.values():
        shape = {"plugin": "cylinder", "filter": "box", "fan": "trapezium"}.get(node.role, "box")
        params = "\\n".join(f"{k}={v}" for k, v in node.raw_params.items())
        label = f"{node.name}\\n{node.kind}" + (f"\\n{params}" if params else "")
        out.append(f'  {_q(node.name)} [shape={shape}, label="{label}"];')
    for node in topology.nodes.values():
        for i, up in enumerate(node.upstreams):
            if is_uri(up):
                out.append(f"  {_q(up)} [shape=note];")
                target, reads = up, None
            else:
                target, reads = node_ref(up)
            out.append(f"  {_q(node.name)} -> {_q(target)}{_edge_attrs(node, i, reads)};")
    for export in topology.exports.values():
        ident = _q("export:" + export.name)
        label = _q(f"{export.name}\n" + "\n".join(export.listen)).replace("\n", "\\n")
        out.append(f"  {ident} [shape=ellipse, style=bold, label={label}];")
        out.append(f"  {ident} -> {_q(export.node)};")
    out.append("}")
    return "\n".join(out)
