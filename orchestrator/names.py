"""Names in a topology that the commands reading a running fabric need too (`status`, `down`,
`logs`, ...): upstream references, and a file's fabric name. Without the typed schema (pydantic),
so those commands start quickly; orchestrator/topology.py validates files with them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import yaml


def is_uri(text: str) -> bool:
    return "://" in text


class Ref(NamedTuple):
    """An upstream that names a node of the topology."""

    node: str
    #: `NODE/EXPORT`: that export of a node that serves several; None: the node's one export.
    export: str | None = None


def node_ref(upstream: str) -> Ref:
    """`files/a.img` -> Ref("files", "a.img"), `disk` -> Ref("disk"); not for URIs (is_uri).
    Node names have no "/", so the first one ends the node; the export may have more."""
    node, slash, export = upstream.partition("/")
    return Ref(node, export if slash else None)


def peek_name(path: str | Path) -> str | None:
    """The fabric name of a file, even an invalid one (for `down`/`status` after an edit)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    if isinstance(data, dict) and isinstance(data.get("name"), str):
        return data["name"]
    return default_name(path)


def default_name(path: str | Path) -> str:
    """Like docker compose: without `name:`, the fabric is named after the file's directory."""
    stem = Path(path).resolve().parent.name or "fabric"
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", stem).lstrip("-_.")
    return name or "fabric"
