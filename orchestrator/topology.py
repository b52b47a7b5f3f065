"""Topology files: the YAML a user writes, checked against a typed schema before anything starts.

Params are validated with each kind's own `Params` model (the one `nbdfabric node` uses); every
error names the file, the line, the node and the field. Pure: no processes, no sockets.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Protocol, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from nodes.params import (
    Params,
    did_you_mean,
    field_info,
    param_key,
    shown_input,
    validate_model,
    whole_number,
)
from nodes.server.addresses import export_identity, repeats, same_export_problem
from nodes.values import parse_duration

from .names import default_name, is_uri, node_ref

RESTART_POLICIES = ("always", "on-failure", "never")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
TOP_LEVEL_KEYS = ("name", "nodes", "exports")


class KindInfo(Protocol):
    """What the validator needs from a node kind (`nodes.registry` classes have it)."""

    kind: str
    role: str
    Params: type[Params]
    magic: str | None
    min_members: int
    shareable: bool  #: several processes can serve it (`nbdfabric node --workers`)

    def multi_export(self, params: Any) -> str | None:
        """None, or what a node of these params serves several exports of ("directory")."""
        ...


# -- errors -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a topology file: where it is and what to do about it."""

    file: str
    line: int | None
    where: str  #: dotted path of the field: `nodes.slow.params.delay-read`
    message: str

    def __str__(self) -> str:
        place = f"{self.file}:{self.line}" if self.line else self.file
        return (
            f"{place}: {self.where}: {self.message}" if self.where else f"{place}: {self.message}"
        )


#: Problems a TopologyError's message lists; `problems` keeps them all.
MAX_SHOWN_PROBLEMS = 50


class TopologyError(ValueError):
    def __init__(self, problems: list[Problem]) -> None:
        # A generated file with 20,000 bad nodes said so 20,000 times: the first ones tell
        # what is wrong, and how many more there are says how widespread it is.
        lines = [str(p) for p in problems[:MAX_SHOWN_PROBLEMS]]
        if len(problems) > MAX_SHOWN_PROBLEMS:
            lines.append(f"... and {len(problems) - MAX_SHOWN_PROBLEMS} more problems")
        super().__init__("\n".join(lines))
        self.problems = problems


# -- the validated topology -------------------------------------------------------------------


class HealthTimes(NamedTuple):
    """How one watcher (the supervisor, compose, docker, a kubelet) watches a node's health."""

    interval: float  #: seconds between checks
    timeout: float  #: seconds one check may take
    retries: int  #: failed checks in a row before the node counts as hung (or unhealthy)
    start_period: float  #: seconds a start may take to serve
    grace: float  #: seconds NOT_SERVING, upstreams healthy, before the supervisor acts


@dataclass(frozen=True)
class Healthcheck:
    """A node's `healthcheck:`, each None where the file says nothing: every watcher then
    keeps its own default (its HealthTimes)."""

    interval: float | None = None
    timeout: float | None = None
    retries: int | None = None
    start_period: float | None = None
    grace: float | None = None

    def over(self, defaults: HealthTimes) -> HealthTimes:
        """Its values, the watcher's `defaults` where it has none."""
        given = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return defaults._replace(**given)


@dataclass(frozen=True)
class Node:
    name: str
    kind: str
    role: str  #: plugin | filter | fan
    params: Params
    #: The params as written (strings for the node's command line), without defaults.
    raw_params: dict[str, Any]
    #: As written, in order: other nodes (`NODE`, or `NODE/EXPORT` for one export of a node
    #: that serves several), or external NBD URIs (anything with `://`). See `node_ref`.
    upstreams: tuple[str, ...] = ()
    restart: str = "always"
    max_restarts: int = 5
    #: `nbdfabric node --poll-max-us`: poll before sleeping, for up to this many µs (0: off).
    poll_max_us: int = 0
    #: `nbdfabric node --workers`: processes serving the node together (1: the node alone).
    workers: int = 1
    healthcheck: Healthcheck = Healthcheck()
    #: None, or what the node serves several exports of, chosen by name ("directory": file
    #: dir=, one per file; "names": exportname; "on-demand": tmpdisk, ondemand); its upstream
    #: references then name one (`NODE/EXPORT`; of all but "directory", a bare `NODE` is its
    #: default export).
    multi_export: str | None = None
    line: int | None = None

    def normalized_params(self) -> dict[str, Any]:
        """Params as comparable values (`1G` and `1073741824` are the same)."""
        return dict(self.params.model_dump(mode="json", by_alias=True))

    def node_upstreams(self) -> tuple[str, ...]:
        """The nodes this one reads from (each once, even when it reads several of a node's
        exports): what it waits for, depends on and is watched with."""
        return tuple(dict.fromkeys(node_ref(u).node for u in self.upstreams if not is_uri(u)))


@dataclass(frozen=True)
class Export:
    name: str
    node: str
    listen: tuple[str, ...]
    description: str = ""
    read_only: bool = False
    tls: str = "off"
    tls_certificates: str | None = None
    tls_psk: str | None = None
    #: The node's Node.multi_export: it then serves all its exports here, and no `name`.
    multi_export: str | None = None

    @property
    def served_name(self) -> str:
        """The export name its URIs carry: its own, or none for a node that serves several
        (clients pick one of those by name; the default export "" is refused)."""
        return "" if self.multi_export else self.name


@dataclass(frozen=True)
class Topology:
    name: str
    source: str
    nodes: dict[str, Node]
    exports: dict[str, Export] = field(default_factory=dict)
    #: The directory relative paths in params are read from (the file's directory).
    base_dir: str = "."
    #: The file's text with variables expanded (what the supervisor is sent).
    text: str = ""

    def export_of(self, node: str) -> Export | None:
        for export in self.exports.values():
            if export.node == node:
                return export
        return None

    def dependents(self, node: str) -> list[str]:
        return [n.name for n in self.nodes.values() if node in n.node_upstreams()]


#: Node.multi_export -> (what the node serves, what an upstream names of it), for messages.
_MULTI_TEXT = {
    "directory": ("a directory (one export per file)", "one of its files"),
    "names": ("the exports its upstream serves", "one of them"),
    "on-demand": ("exports made on demand", "one"),
}
#: Node.multi_export values with a default export (""), which a bare `NODE` names.
_HAS_DEFAULT = ("names", "on-demand")


# -- structural schema (per node / per export) -------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, alias_generator=lambda n: n.replace("_", "-")
    )


_POLL_HELP = (
    "poll the node's sockets for up to this many µs before it sleeps (adaptive, as QEMU's "
    "poll-max-ns): lower latency at low queue depth for a busy core; 0: off"
)
_WORKERS_HELP = (
    "processes serving the node together, sharing its sockets and its data (a client's "
    "connections spread over as many cores); only kinds that can share their state take more "
    "than 1 (see `nbdfabric kinds`)"
)
_ONE_WORKER_HELP = "this kind keeps its state in one process: one worker only"
_UPSTREAM_HELP = (
    "what a filter reads from: a node, NODE/EXPORT for one export of a node that serves several "
    "(file with dir=: NODE/FILE), or an NBD URI"
)


class HealthcheckDef(_Strict):
    """A node's `healthcheck:`, named as docker compose names its own (plus `grace`)."""

    interval: float | None = Field(None, gt=0, description="time between health checks")
    timeout: float | None = Field(None, gt=0, description="time one health check may take")
    retries: int | None = Field(
        None, ge=1, description="failed checks in a row before the node counts as hung"
    )
    start_period: float | None = Field(
        None, gt=0, description="time a start may take until the node serves"
    )
    grace: float | None = Field(
        None,
        ge=0,
        description="time a node may report NOT_SERVING, its upstreams healthy, before the "
        "supervisor restarts it (a fan is reported failed instead)",
    )

    @field_validator("interval", "timeout", "start_period", "grace", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return None if value is None else parse_duration(value)

    @field_validator("retries", mode="before")
    @classmethod
    def _ascii_whole_number(cls, value: Any) -> Any:
        return whole_number(value) if isinstance(value, str) else value


class NodeDef(_Strict):
    """One entry of `nodes:`."""

    kind: str = Field(description="node kind (see `nbdfabric kinds`)")
    params: dict[str, Any] = Field(default_factory=dict, description="the kind's params")
    upstream: str | None = Field(None, description=_UPSTREAM_HELP)
    upstreams: list[str] | None = Field(
        None, description="a fan's members, in order (each as `upstream`)"
    )
    restart: Literal["always", "on-failure", "never"] = Field(
        "always", description="restart policy when the node exits or stops serving"
    )
    max_restarts: int = Field(
        5, ge=0, description="consecutive failed restarts before giving up on the node"
    )
    poll_max_us: int = Field(0, ge=0, description=_POLL_HELP)
    workers: int = Field(1, ge=1, description=_WORKERS_HELP)
    healthcheck: HealthcheckDef | None = Field(
        None,
        description="how the node's health is watched (durations: 2, 1.5s, 500ms)",
    )

    @field_validator("max_restarts", "poll_max_us", "workers", mode="before")
    @classmethod
    def _ascii_whole_number(cls, value: Any) -> Any:
        return whole_number(value) if isinstance(value, str) else value  # not `1_0`, `٣`


class ExportDef(_Strict):
    """One entry of `exports:`; its key is the NBD export name."""

    node: str = Field(description="the node this export serves")
    listen: list[str] = Field(
        min_length=1, description="addresses: HOST:PORT, [::1]:PORT or unix:PATH"
    )
    description: str = Field("", description="export description shown to clients")
    read_only: bool = Field(False, description="refuse writes on this export")
    tls: Literal["off", "on", "require"] = "off"
    tls_certificates: str | None = Field(None, description="directory with TLS certificates")
    tls_psk: str | None = Field(None, description="TLS pre-shared keys file")


# -- YAML with line numbers ---------------------------------------------------------------------


class _Lines:
    """Line numbers of every key and item of a YAML document, by path, plus duplicate keys."""

    def __init__(self, root: yaml.Node | None) -> None:
        self.lines: dict[tuple[Any, ...], int] = {}
        self.duplicates: list[tuple[tuple[Any, ...], int]] = []
        if root is not None:
            self.lines[()] = root.start_mark.line + 1
            self._walk(root, ())

    def _walk(self, node: yaml.Node, path: tuple[Any, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key, value in node.value:
                k = key.value if isinstance(key, yaml.ScalarNode) else None
                sub = (*path, k)
                if k in seen:
                    self.duplicates.append((sub, key.start_mark.line + 1))
                seen.add(k)
                self.lines[sub] = key.start_mark.line + 1
                self._walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.lines[(*path, i)] = item.start_mark.line + 1
                self._walk(item, (*path, i))

    def line(self, path: tuple[Any, ...]) -> int | None:
        """The line of `path`, or of its nearest ancestor that exists in the file."""
        while path not in self.lines and path:
            path = path[:-1]
        return self.lines.get(path)


#: Most YAML nodes a topology may expand to, an alias counted each time it is used. A fabric
#: has hundreds; "billion laughs" (aliases of lists of aliases) has billions, and every walk of
#: the document (line numbers, validation, messages) would take that long: `validate` and the
#: supervisor's Apply hung. Go's yaml.v3, which docker compose uses, refuses those too.
MAX_YAML_NODES = 100_000


def _graph_problem(root: yaml.Node | None) -> tuple[int, str] | None:
    """(line, message) if the composed document cannot be walked as a tree: an alias inside the
    node it names (`&a [*a]`: endless, _Lines recursed until RecursionError) or too many nodes
    once aliases are expanded. Iterative, so that depth costs no stack."""
    if root is None:
        return None
    count = 0
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, leaving = stack.pop()
        if leaving:
            on_path.discard(id(node))
            continue
        count += 1
        if count > MAX_YAML_NODES:
            return (
                node.start_mark.line + 1,
                f"the document expands to more than {MAX_YAML_NODES} YAML nodes "
                "(aliases of aliases?); a topology is far smaller",
            )
        if isinstance(node, yaml.MappingNode | yaml.SequenceNode):
            if id(node) in on_path:
                return (
                    node.start_mark.line + 1,
                    "a YAML alias is used inside the node it names (a recursive structure)",
                )
            on_path.add(id(node))
            stack.append((node, True))
            children: list[yaml.Node] = (
                [part for pair in node.value for part in pair]
                if isinstance(node, yaml.MappingNode)
                else list(node.value)
            )
            stack.extend((child, False) for child in reversed(children))
    return None


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel]:
    """The model of the mapping at `loc` inside `model` (a nested section such as
    `healthcheck`), for the fields an unknown key there could have been."""
    for key in loc:
        by_alias = {f.alias or n: f for n, f in model.model_fields.items()}
        inner = by_alias.get(str(key)) or model.model_fields.get(str(key))
        kinds = typing.get_args(inner.annotation) or (inner.annotation,) if inner else ()
        models = [t for t in kinds if isinstance(t, type) and issubclass(t, BaseModel)]
        if not models:  # (`X | None` is a section X)
            break
        model = models[0]
    return model


def _dotted(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# -- loading and validation ------------------------------------------------------------------------


def default_kinds() -> Mapping[str, KindInfo]:
    from nodes import registry

    return registry.catalog()


def load(path: str | Path, kinds: Mapping[str, KindInfo] | None = None) -> Topology:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise TopologyError([Problem(str(p), None, "", f"cannot read: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:  # a binary file, or another encoding: YAML is UTF-8 here
        line = p.read_bytes()[: exc.start].count(b"\n") + 1
        raise TopologyError(
            [
                Problem(
                    str(p),
                    line,
                    "",
                    f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
                    f"at offset {exc.start}): a topology file is YAML in UTF-8",
                )
            ]
        ) from None
    topology = load_text(text, str(p), kinds, base_dir=str(p.resolve().parent))
    return dataclasses.replace(topology, text=expand_env(text, str(p), os.environ))


def load_or_report(path: str | Path) -> Topology | None:
    """The topology in `path`, or None after printing every problem found in it (for CLIs)."""
    try:
        return load(path)
    except TopologyError as exc:
        print(exc, file=sys.stderr)
        return None


def load_text(
    text: str,
    source: str = "<topology>",
    kinds: Mapping[str, KindInfo] | None = None,
    base_dir: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Topology:
    """Parse and validate a topology; raises TopologyError with every problem found.

    `${VAR}` and `${VAR:-default}` are replaced from `env` (default: os.environ) first, as
    docker compose does; `$$` is a literal `$`. With env={} nothing is expanded.
    """
    if env is None or env:
        text = expand_env(text, source, os.environ if env is None else env)
    v = _Validator(source, kinds if kinds is not None else default_kinds())
    return v.run(text, base_dir or str(Path(source).resolve().parent))


_VAR_RE = re.compile(r"\$(\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\})")


def expand_env(text: str, source: str, env: Mapping[str, str]) -> str:
    """Compose-style variables; an unset variable without a default is an error."""
    problems: list[Problem] = []
    out = []
    for lineno, line in enumerate(text.splitlines(keepends=True), 1):

        def repl(m: re.Match[str], lineno: int = lineno) -> str:
            if m.group(1) == "$":
                return "$"
            name, default = m.group(2), m.group(3)
            if name in env and (env[name] or default is None):
                return env[name]
            if default is not None:
                return default
            problems.append(Problem(source, lineno, "", f"variable {name} is not set"))
            return ""

        out.append(_VAR_RE.sub(repl, line))
    if problems:
        raise TopologyError(problems)
    return "".join(out)


class _Validator:
    def __init__(self, source: str, kinds: Mapping[str, KindInfo]) -> None:
        self.source = source
        self.kinds = kinds
        self.problems: list[Problem] = []
        self.lines = _Lines(None)
        self.base_dir = "."  #: where the nodes run (run() sets it): relative sockets start there

    def problem(self, path: tuple[Any, ...], message: str) -> None:
        self.problems.append(Problem(self.source, self.lines.line(path), _dotted(path), message))

    def fail_if_problems(self) -> None:
        if self.problems:
            raise TopologyError(self.problems)

    def run(self, text: str, base_dir: str) -> Topology:
        self.base_dir = base_dir
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
            graph = _graph_problem(root)
            if graph is not None:
                raise TopologyError([Problem(self.source, graph[0], "", graph[1])])
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            msg = " ".join(str(getattr(exc, "problem", "") or exc).split())
            raise TopologyError(
                [Problem(self.source, line, "", f"YAML syntax error: {msg}")]
            ) from None
        except ValueError as exc:  # PyYAML's int(): an integer of more than 4300 digits
            raise TopologyError(
                [Problem(self.source, None, "", f"YAML value error: {exc}")]
            ) from None
        except RecursionError:  # PyYAML's composer recurses once per level of nesting
            raise TopologyError(
                [Problem(self.source, None, "", "YAML nested too deeply (thousands of levels)")]
            ) from None
        self.lines = _Lines(root)
        for path, line in self.lines.duplicates:
            self.problems.append(
                Problem(self.source, line, _dotted(path), "duplicate key (the first is ignored)")
            )
        if not isinstance(data, dict):
            self.problem((), "expected a mapping with 'name', 'nodes' and 'exports'")
            self.fail_if_problems()
        for key in data:
            if key not in TOP_LEVEL_KEYS and not str(key).startswith("x-"):
                self.problem((key,), f"unknown key (accepts: {', '.join(TOP_LEVEL_KEYS)})")

        name = data.get("name", default_name(self.source))
        if not isinstance(name, str) or not NAME_RE.match(name):
            self.problem(("name",), f"bad fabric name {name!r} (letters, digits, '-', '_', '.')")
        raw_nodes = data.get("nodes")
        if not isinstance(raw_nodes, dict) or not raw_nodes:
            self.problem(("nodes",), "a fabric needs at least one node (nodes: {NAME: {kind: ..}})")
            self.fail_if_problems()
        raw_exports = data.get("exports") or {}
        if not isinstance(raw_exports, dict):
            self.problem(("exports",), "expected a mapping of export names to {node, listen}")
            raw_exports = {}

        nodes: dict[str, Node] = {}
        for node_name, body in raw_nodes.items():
            node = self.node(str(node_name), body)
            if node is not None:
                nodes[node.name] = node
        self.check_links(raw_nodes, nodes)
        exports = self.exports(raw_exports, raw_nodes, nodes)
        self.fail_if_problems()
        return Topology(str(name), self.source, nodes, exports, base_dir)

    # nodes ----------------------------------------------------------------------------------

    def node(self, name: str, body: Any) -> Node | None:
        path: tuple[Any, ...] = ("nodes", name)
        if not NAME_RE.match(name):
            self.problem(path, "bad node name (letters, digits, '-', '_', '.'; at most 63)")
            return None
        if not isinstance(body, dict):
            self.problem(path, "expected a mapping like {kind: memory, params: {size: 1G}}")
            return None
        if "kind" in body and body["kind"] is None:
            body = {**body, "kind": "null"}  # `kind: null` is YAML's null: the null plugin
        try:
            spec = NodeDef.model_validate(body)
        except ValidationError as exc:
            self.pydantic_problems(path, exc, NodeDef)
            return None
        cls = self.kinds.get(spec.kind)
        if cls is None:
            known = ", ".join(sorted(self.kinds)) or "(none)"
            hint = did_you_mean(spec.kind, self.kinds)
            self.problem((*path, "kind"), f"unknown kind {spec.kind!r}{hint} (known: {known})")
            return None
        if spec.upstream is not None and spec.upstreams is not None:
            self.problem(path, "give either 'upstream' or 'upstreams', not both")
            return None
        upstreams = [spec.upstream] if spec.upstream is not None else list(spec.upstreams or [])
        field_name = "upstream" if spec.upstream is not None else "upstreams"
        if cls.role == "plugin" and upstreams:
            self.problem((*path, field_name), f"{spec.kind} is a plugin: it takes no upstream")
        elif cls.role == "filter" and len(upstreams) != 1:
            if upstreams:
                self.problem(
                    (*path, field_name),
                    f"{spec.kind} is a filter: it takes exactly one upstream "
                    f"(got {len(upstreams)})",
                )
            else:
                self.problem(path, f"{spec.kind} is a filter: it needs 'upstream: NODE'")
        elif cls.role == "fan" and len(upstreams) < cls.min_members:
            where = (*path, "upstreams") if "upstreams" in body or "upstream" in body else path
            self.problem(
                where,
                f"{spec.kind} is a fan: it needs at least {cls.min_members} members in "
                f"'upstreams' (got {len(upstreams)})",
            )
        for i, j in self.repeated_members(upstreams):
            problem = same_export_problem(i, upstreams[i], j, upstreams[j], repr)
            self.problem((*path, field_name, j), f"{spec.kind} {name!r}: {problem}")
        if spec.workers > 1 and not cls.shareable:
            can = ", ".join(sorted(k for k, c in self.kinds.items() if c.shareable)) or "(none)"
            self.problem(
                (*path, "workers"),
                f"{spec.kind} keeps its state in one process, so it cannot be served by several "
                f"workers (kinds that can: {can})",
            )
        params = self.params(path, spec.kind, cls, spec.params)
        if params is None:
            return None
        return Node(
            name=name,
            kind=spec.kind,
            role=cls.role,
            params=params,
            raw_params=dict(spec.params),
            upstreams=tuple(upstreams),
            restart=spec.restart,
            max_restarts=spec.max_restarts,
            poll_max_us=spec.poll_max_us,
            workers=spec.workers,
            healthcheck=Healthcheck(**spec.healthcheck.model_dump())
            if spec.healthcheck
            else Healthcheck(),
            multi_export=cls.multi_export(params),
            line=self.lines.line(path),
        )

    def repeated_members(self, upstreams: list[str]) -> list[tuple[int, int]]:
        """(i, j) for each of a node's upstreams J that is the export an earlier one I is:
        the same node reference (`NODE`, `NODE/EXPORT`), or a URI with the same
        export_identity (relative unix sockets are where the nodes run: the file's directory)."""
        return repeats(
            export_identity(up, self.base_dir) if is_uri(up) else ("node", *node_ref(up))
            for up in upstreams
        )

    def params(
        self, path: tuple[Any, ...], kind: str, cls: KindInfo, values: dict[str, Any]
    ) -> Params | None:
        try:
            return validate_model(cls.Params, {str(k): v for k, v in values.items()})
        except ValidationError as exc:
            errors = exc.errors()
        info = {e["name"]: e for e in field_info(cls.Params)}
        names = ", ".join(info) or "(none)"
        for err in errors:
            key = param_key(err["loc"])
            where = (*path, "params", key)
            if err["type"] == "extra_forbidden":
                hint = did_you_mean(key, info)
                self.problem(where, f"unknown parameter of {kind}{hint} (accepts: {names})")
            elif err["type"] == "missing":
                self.problem((*path, "params"), f"{kind} needs parameter '{key}'")
            else:
                accepts = info.get(key, {}).get("type", "?")
                msg = str(err["msg"]).removeprefix("Value error, ")
                self.problem(
                    where,
                    f"bad value {shown_input(err.get('input'))} for {kind} (accepts {accepts}): "
                    f"{msg}",
                )
        return None

    def check_links(self, raw: dict[Any, Any], nodes: dict[str, Node]) -> None:
        names = [str(n) for n in raw]
        from nodes.server.addresses import AddressError, check_nbd_uri

        for node in nodes.values():
            for i, up in enumerate(node.upstreams):
                if is_uri(up):
                    # `http://x` passed here and failed at every (re)start of the node
                    try:
                        check_nbd_uri(up)
                    except AddressError as exc:
                        self.problem(self.upstream_path(node, i), str(exc))
                    continue
                message = self.link_problem(node, up, names, nodes)
                if message:
                    self.problem(self.upstream_path(node, i), message)
        # Cycles, reported once each, from the node where the walk found them.
        state: dict[str, int] = {}  # 1 = on the stack, 2 = done
        stack: list[str] = []

        def visit(name: str) -> None:
            state[name] = 1
            stack.append(name)
            node = nodes[name]
            for i, text in enumerate(node.upstreams):
                up = "" if is_uri(text) else node_ref(text).node
                if up not in nodes or up == name:
                    continue
                if state.get(up) == 1:
                    cycle = [*stack[stack.index(up) :], up]
                    self.problem(self.upstream_path(node, i), "cycle: " + " -> ".join(cycle))
                elif up not in state:
                    visit(up)
            stack.pop()
            state[name] = 2

        for name in nodes:
            if name not in state:
                visit(name)

    def link_problem(
        self, node: Node, up: str, names: list[str], nodes: dict[str, Node]
    ) -> str | None:
        """What is wrong with upstream `up` (a node reference) of `node`, if anything."""
        ref = node_ref(up)
        if ref.node not in names:
            return f"no node named {ref.node!r} (nodes: {', '.join(names)})"
        if ref.node == node.name:
            return "a node cannot be its own upstream"
        if ref.export == "":
            return f"{up!r} names no export after '/': write '{ref.node}/NAME'"
        target = nodes.get(ref.node)
        if target is None:  # invalid itself, and reported
            return None
        # An exportname node has a default export (""), which a bare reference names.
        if target.multi_export and target.multi_export not in _HAS_DEFAULT and ref.export is None:
            what, which = _MULTI_TEXT.get(target.multi_export, ("several exports", "one"))
            return f"node {ref.node!r} serves {what}: name {which}, '{ref.node}/NAME'"
        if not target.multi_export and ref.export is not None:
            return (
                f"node {ref.node!r} serves one export: write {ref.node!r} ('NODE/EXPORT' names "
                "one export of a node that serves several, as file with dir= does)"
            )
        return None

    def upstream_path(self, node: Node, index: int) -> tuple[Any, ...]:
        if (("nodes", node.name, "upstream")) in self.lines.lines:
            return ("nodes", node.name, "upstream")
        return ("nodes", node.name, "upstreams", index)

    # exports --------------------------------------------------------------------------------

    def exports(
        self, raw: dict[Any, Any], raw_nodes: dict[Any, Any], nodes: dict[str, Node]
    ) -> dict[str, Export]:
        from nodes.server.addresses import AddressError, parse_address

        out: dict[str, Export] = {}
        used: dict[Any, str] = {}  # address key -> export name
        exported: dict[str, str] = {}  # node -> export name
        names = [str(n) for n in raw_nodes]
        for export_name, body in raw.items():
            path: tuple[Any, ...] = ("exports", str(export_name))
            if not isinstance(body, dict):
                self.problem(path, "expected a mapping like {node: NAME, listen: [ADDR]}")
                continue
            try:
                spec = ExportDef.model_validate(body)
            except ValidationError as exc:
                self.pydantic_problems(path, exc, ExportDef)
                continue
            ok = True
            if spec.node not in names:
                hint = ""
                if "/" in spec.node:
                    hint = f"; to export {spec.node!r} alone, put a filter over it"
                self.problem(
                    (*path, "node"),
                    f"no node named {spec.node!r} (nodes: {', '.join(names)}){hint}",
                )
                ok = False
            elif spec.node in exported:
                self.problem(
                    (*path, "node"),
                    f"node {spec.node!r} is already exported as {exported[spec.node]!r} "
                    "(one export per node; put a filter in front to export it again)",
                )
                ok = False
            else:
                exported[spec.node] = str(export_name)
            for i, text in enumerate(spec.listen):
                try:
                    addr = parse_address(text)
                except AddressError as exc:
                    self.problem((*path, "listen", i), str(exc))
                    ok = False
                    continue
                if addr.kind == "fd":
                    self.problem((*path, "listen", i), "fd: addresses cannot be used in a topology")
                    ok = False
                    continue
                checks, takes = _address_keys(addr)
                clash = next((used[k] for k in checks if k in used), None)
                if clash is not None:
                    self.problem(
                        (*path, "listen", i), f"address {text} is already used by export {clash!r}"
                    )
                    ok = False
                    continue
                for key in takes:
                    used.setdefault(key, str(export_name))
            if spec.tls != "off" and not (spec.tls_certificates or spec.tls_psk):
                self.problem((*path, "tls"), "tls on/require needs 'tls-certificates' or 'tls-psk'")
                ok = False
            target = nodes.get(spec.node)  # None when invalid itself (then reported)
            if ok:
                out[str(export_name)] = Export(
                    name=str(export_name),
                    node=spec.node,
                    listen=tuple(spec.listen),
                    description=spec.description,
                    read_only=spec.read_only,
                    tls=spec.tls,
                    tls_certificates=spec.tls_certificates,
                    tls_psk=spec.tls_psk,
                    multi_export=target.multi_export if target else None,
                )
        return out

    def pydantic_problems(
        self, path: tuple[Any, ...], exc: ValidationError, model: type[BaseModel]
    ) -> None:
        for err in exc.errors():
            where = (*path, *err["loc"])
            if err["type"] == "extra_forbidden":
                fields = _fields_at(model, err["loc"][:-1]).model_fields
                accepts = ", ".join(f.alias or n for n, f in fields.items())
                hint = did_you_mean(str(err["loc"][-1]), accepts.split(", "))
                self.problem(where, f"unknown field{hint} (accepts: {accepts})")
            elif err["type"] == "missing":
                self.problem(where, "required field is missing")
            else:
                msg = str(err["msg"]).removeprefix("Value error, ")
                self.problem(where, f"bad value {shown_input(err.get('input'))}: {msg}")


def _address_keys(addr: Any) -> tuple[list[Any], list[Any]]:
    """(keys that would collide, keys this address takes): the same unix path; the same TCP
    port on the same host or where either side is a wildcard. Port 0 never collides."""
    if addr.kind == "unix":
        key = ("unix", str(Path(addr.path).resolve()))
        return [key], [key]
    if addr.port == 0:
        return [], []
    if addr.host in ("0.0.0.0", "::", ""):
        return [("port", addr.port)], [("wild", addr.port), ("port", addr.port)]
    own = ("tcp", addr.host, addr.port)
    return [own, ("wild", addr.port)], [own, ("port", addr.port)]


# -- JSON Schema for editors ---------------------------------------------------------------


_FLEX_FORMATS = {"size": "integer", "duration": "number", "rate": "number", "errno": "integer"}


def json_schema(kinds: Mapping[str, KindInfo] | None = None) -> dict[str, Any]:
    """JSON Schema of a topology file, built from every kind's Params (editors, `schema`)."""
    kinds = kinds if kinds is not None else default_kinds()
    common = {
        "restart": (
            Literal["always", "on-failure", "never"],
            Field("always", description="restart policy"),
        ),
        "max_restarts": (int, Field(5, ge=0, description="failed restarts before giving up")),
        "poll_max_us": (int, Field(0, ge=0, description=_POLL_HELP)),
        "workers": (int, Field(1, ge=1, description=_WORKERS_HELP)),
        "healthcheck": (HealthcheckDef, Field(None, description="how health is watched")),
    }
    variants: list[Any] = []
    for kind, cls in sorted(kinds.items()):
        required = any(f.is_required() for f in cls.Params.model_fields.values())
        fields: dict[str, Any] = {
            "kind": (Literal[kind], Field(description=_summary(cls))),
            "params": (cls.Params, Field(...) if required else Field(None)),
            **common,
        }
        if not cls.shareable:  # validate refuses more than one worker for it
            fields["workers"] = (int, Field(1, ge=1, le=1, description=_ONE_WORKER_HELP))
        if cls.role == "filter":
            fields["upstream"] = (str, Field(description=_UPSTREAM_HELP))
        elif cls.role == "fan":
            fields["upstreams"] = (
                list[str],
                Field(
                    min_length=cls.min_members,
                    description="members, in order: nodes, NODE/EXPORT or NBD URIs",
                ),
            )
        variants.append(
            create_model(  # type: ignore[call-overload]
                f"{_camel(kind)}Node", __base__=_Strict, **fields
            )
        )
    node_type: Any = (
        Annotated[Union[tuple(variants)], Field(discriminator="kind")]  # noqa: UP007
        if len(variants) > 1
        else variants[0]
    )
    model = create_model(
        "Topology",
        __base__=_Strict,
        name=(str, Field(None, pattern=NAME_RE.pattern, description="fabric name")),
        nodes=(dict[str, node_type], Field(description="node name -> node")),
        exports=(dict[str, ExportDef], Field(None, description="export name -> export")),
    )
    schema = model.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "nbdfabric topology"
    _flex(schema)
    return schema


def _flex(node: Any) -> None:
    """`size: 1G` is a string in YAML: let sizes, durations, rates and errnos be strings too."""
    if isinstance(node, dict):
        fmt = node.get("format")
        if fmt in _FLEX_FORMATS and "type" in node:
            node.pop("type")
            node["anyOf"] = [{"type": _FLEX_FORMATS[fmt]}, {"type": "string"}]
        for value in node.values():
            _flex(value)
    elif isinstance(node, list):
        for value in node:
            _flex(value)


def _camel(kind: str) -> str:
    return "".join(part.capitalize() for part in re.split(r"[^A-Za-z0-9]", kind))


def _summary(cls: KindInfo) -> str:
    doc = getattr(cls, "__doc__", None) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""
