"""The `nbdfabric node` command words for a topology node: its params, options and export flags.

Every way of running a fabric (local processes, compose services, Kubernetes containers) builds
node command lines from these; each adds its own listen, upstream and control addresses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:  # (not at run time: `status` and `down` start without the typed schema)
    from .topology import Export, Node, Topology

PathMap = Callable[[str], str]


def _same(path: str) -> str:
    return path


def uri_path(export: str) -> str:
    """An export name as the path of an NBD URI (`nbd://HOST:PORT/PATH`): percent-encoded,
    as libnbd and qemu decode it (a file name may have spaces, '?' or '#')."""
    return quote(export, safe="")


def param_text(value: Any) -> str:
    """A param value as the node CLI reads it back (`true`, `a,b`, `1048576`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(param_text(v) for v in value)
    return str(value)


def param_words(node: Node, map_file: PathMap = _same) -> list[str]:
    """`KEY=VALUE` words; the values of params that name files or directories (declared with
    `path=True`) go through `map_file` (a container's view of them).

    A param that may be repeated gives one word per value (`file=a file=b`, not `file=a,b`);
    one that follows another (partitioning's `mbr-id` follows `file`, see params.repeated)
    goes before each value of that one, as the node's command line reads it."""
    from nodes.params import BARE, field_info, passes_on

    entries = {e["name"]: e for e in field_info(type(node.params))}
    follows = {name: e["follows"] for name, e in entries.items() if e["follows"]}
    dumped = node.params.model_dump(mode="json", by_alias=True)
    # Keys a kind passes on (sh, eval: to the script's config): one word per value, in order;
    # values without a key (BARE) last, as bare words (the first word names the script).
    others = set(node.params.model_extra or ()) if passes_on(type(node.params)) else set()
    words, bare = [], []

    def word(key: str, value: Any) -> str:
        text = param_text(value)
        entry = entries.get(key.replace("_", "-"), {})
        if entry.get("path") and text:
            text = map_file(text)
        elif entry.get("secret") and text.startswith("+") and len(text) > 1:
            text = "+" + map_file(text[1:])  # a secret kept in a file (nodes/passwords.py)
        return f"{key}={text}"

    for raw_key, value in node.raw_params.items():
        if str(raw_key) in others:
            items = value if isinstance(value, list | tuple) else [value]
            if raw_key == BARE:
                bare += [param_text(v) for v in items]
            else:
                words += [f"{raw_key}={param_text(v)}" for v in items]
            continue
        key = str(raw_key).replace("_", "-")
        if key in follows:
            continue  # placed among the values it follows, below
        if not entries.get(key, {}).get("repeat"):
            words.append(word(str(raw_key), value))
            continue
        items = value if isinstance(value, list | tuple) else [value]
        for i, item in enumerate(items):
            for name, leader in follows.items():
                given = dumped.get(name) or []
                if leader == key and given and (len(given) > 1 or i == 0):
                    words.append(word(name, given[i if len(given) > 1 else 0]))
            words.append(word(key, item))
    return words + bare


def secrets_in_clear(topology: Topology) -> list[str]:
    """A warning for each secret param the topology gives as the secret itself: a compose
    file or a manifest made from it holds the secret, and so does every listing of the
    node's command line (`ps`, `docker inspect`, the pod spec). `+FILE` keeps it in a file."""
    from nodes.params import field_info

    warnings = []
    for node in topology.nodes.values():
        secret = {e["name"] for e in field_info(type(node.params)) if e["secret"]}
        for raw_key, value in node.raw_params.items():
            key = str(raw_key).replace("_", "-")
            if key in secret and value is not None and not str(value).startswith(("+", "-")):
                warnings.append(
                    f"node {node.name!r}: {key} is written out in clear (as is every node "
                    f"argument); give it as {key}: +FILE to keep it in a file"
                )
    return warnings


def state_words(node: Node, path: str) -> list[str]:
    """`KEY=PATH` for a kind that keeps state across restarts (Backend.state_param: a
    mirror's bitmap-file, parity's state-file) when the topology names no file itself."""
    from nodes import registry

    state = registry.get(node.kind).state_param
    return [f"{state}={path}"] if state and state not in node.raw_params else []


def option_words(node: Node) -> list[str]:
    """The node's own flags from the topology (only those set)."""
    words = ["--poll-max-us", str(node.poll_max_us)] if node.poll_max_us else []
    if node.workers > 1:
        words += ["--workers", str(node.workers)]
    return words


def export_words(
    export: Export,
    *,
    tls: bool = True,
    map_dir: PathMap = _same,
    map_secret: PathMap = _same,
) -> list[str]:
    """Export name, description, read-only and (with `tls`) the TLS flags of an exported node.

    A node that serves several exports (file dir=) gets no name: it refuses one, and serves
    them all on the export's addresses."""
    words = ["--export-name", export.name] if export.served_name else []
    if export.description:
        words += ["--description", export.description]
    if export.read_only:
        words += ["--read-only"]
    if tls and export.tls != "off":
        words += [f"--tls={export.tls}"]
        if export.tls_certificates:
            words += ["--tls-certificates", map_dir(export.tls_certificates)]
        if export.tls_psk:
            words += ["--tls-psk", map_secret(export.tls_psk)]
    return words
