"""Drawing a topology: a text tree from each export (or unexported root) down to its plugins,
and Graphviz DOT. Pure.
"""

from __future__ import annotations

from .topology import Node, Topology, is_uri


def _label(node: Node) -> str:
    params = " ".join(f"{k}={v}" for k, v in node.raw_params.items())
    return f"{node.name} ({node.kind}{', ' + params if params else ''})"


def text_tree(topology: Topology) -> str:
    lines = [f"fabric {topology.name}"]
    used = {u for n in topology.nodes.values() for u in n.upstreams}
    roots: list[tuple[str, str]] = [
        (f"export {e.name} [{', '.join(e.listen)}]", e.node) for e in topology.exports.values()
    ]
    exported = {e.node for e in topology.exports.values()}
    roots += [("(not exported)", n) for n in topology.nodes if n not in used | exported]

    def walk(name: str, prefix: str, last: bool, seen: tuple[str, ...]) -> None:
        branch = "└── " if last else "├── "
        if is_uri(name):
            lines.append(f"{prefix}{branch}{name} (external)")
            return
        node = topology.nodes[name]
        shared = (
            " (shared)" if sum(name in n.upstreams for n in topology.nodes.values()) > 1 else ""
        )
        lines.append(f"{prefix}{branch}{_label(node)}{shared}")
        child_prefix = prefix + ("    " if last else "│   ")
        for i, up in enumerate(node.upstreams):
            walk(up, child_prefix, i == len(node.upstreams) - 1, (*seen, name))

    for title, node in roots:
        lines.append(title)
        walk(node, "", True, ())
    return "\n".join(lines)


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


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
            attrs = f" [label={i}]" if node.role == "fan" else ""
            if is_uri(up):
                out.append(f"  {_q(up)} [shape=note];")
            out.append(f"  {_q(node.name)} -> {_q(up)}{attrs};")
    for export in topology.exports.values():
        ident = _q("export:" + export.name)
        label = _q(f"{export.name}\n" + "\n".join(export.listen)).replace("\n", "\\n")
        out.append(f"  {ident} [shape=ellipse, style=bold, label={label}];")
        out.append(f"  {ident} -> {_q(export.node)};")
    out.append("}")
    return "\n".join(out)
